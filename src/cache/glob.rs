//! Globs for rules and invalidation: `*` is any run of characters, `?` any one; nothing else is
//! special.

/// Whether `text` matches `pattern` as a whole.
pub fn glob_match(pattern: &str, text: &str) -> bool {
    let (p, t): (Vec<char>, Vec<char>) = (pattern.chars().collect(), text.chars().collect());
    // Iterative matching with one backtrack point for the last `*`.
    let (mut pi, mut ti) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while ti < t.len() {
        match p.get(pi) {
            Some('*') => {
                star = Some((pi, ti));
                pi += 1;
            }
            Some(&c) if c == '?' || c == t[ti] => {
                pi += 1;
                ti += 1;
            }
            _ => match star {
                Some((sp, st)) => {
                    pi = sp + 1;
                    ti = st + 1;
                    star = Some((sp, st + 1));
                }
                None => return false,
            },
        }
    }
    p[pi..].iter().all(|&c| c == '*')
}

#[cfg(test)]
mod tests {
    use super::glob_match;

    #[test]
    fn globs() {
        assert!(glob_match("*", "orders"));
        assert!(glob_match("order*", "orders"));
        assert!(glob_match("o?ders", "orders"));
        assert!(glob_match("app/*/x", "app/alice/x"));
        assert!(glob_match("*s", "orders"));
        assert!(glob_match("a*b*c", "axxbyyc"));
        assert!(!glob_match("order", "orders"));
        assert!(!glob_match("a*b", "axxc"));
        assert!(!glob_match("public.*", "orders"));
        assert!(glob_match("", ""));
    }
}
