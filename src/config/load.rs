//! Reading `proxy.toml`: parse, apply `PGCACHE_<SECTION>_<KEY>` environment overrides, validate.
//! Every problem names its key and, when the key is in the file, its line, so `pgcache check`
//! can print them all at once.

use super::{AuthMethod, ChannelBinding, ClientTlsMode, Config, UpstreamAuth, UpstreamTlsMode};
use std::fmt;
use std::net::SocketAddr;
use std::path::Path;

/// One thing wrong with a configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// Dotted key, e.g. `pool.max_size`.
    pub key: String,
    /// 1-based line in the file, when the key appears there.
    pub line: Option<usize>,
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.line {
            Some(l) => write!(f, "line {l}: {}: {}", self.key, self.message),
            None => write!(f, "{}: {}", self.key, self.message),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub struct ConfigError {
    pub origin: String,
    pub problems: Vec<Problem>,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "{}: {} problem(s)", self.origin, self.problems.len())?;
        for p in &self.problems {
            writeln!(f, "  {p}")?;
        }
        Ok(())
    }
}

/// Read and validate a file.
pub fn load_file(path: &Path) -> Result<Config, ConfigError> {
    let origin = path.display().to_string();
    let src = std::fs::read_to_string(path).map_err(|e| ConfigError {
        origin: origin.clone(),
        problems: vec![Problem {
            key: "(file)".into(),
            line: None,
            message: format!("cannot read: {e}"),
        }],
    })?;
    load_str(&src, &origin, std::env::vars())
}

/// Parse, override from `env` and validate `src`.
pub fn load_str(
    src: &str,
    origin: &str,
    env: impl Iterator<Item = (String, String)>,
) -> Result<Config, ConfigError> {
    let fail = |problems| ConfigError {
        origin: origin.to_string(),
        problems,
    };
    let (mut problems, parsed) = parse_all(src);
    let Some(mut config) = parsed else {
        return Err(fail(problems));
    };
    let overrides: Vec<(String, String)> = env.filter(|(k, _)| k.starts_with("PGCACHE_")).collect();
    if problems.is_empty() && !overrides.is_empty() {
        config = super::env::apply_env(src, overrides.clone()).map_err(fail)?;
    }
    let mut semantic = validate(&config);
    for p in &mut semantic {
        // A value from the environment is not on any line of the file: name the variable.
        let var = format!("PGCACHE_{}", p.key.replace('.', "_").to_ascii_uppercase());
        if overrides.iter().any(|(k, _)| *k == var) {
            p.message = format!("{} (from environment variable {var})", p.message);
        } else {
            p.line = line_of(src, &p.key);
        }
    }
    problems.extend(semantic);
    if problems.is_empty() {
        Ok(config)
    } else {
        Err(fail(problems))
    }
}

/// Semantic checks that types alone cannot express.
pub fn validate(c: &Config) -> Vec<Problem> {
    let mut out = Vec::new();
    let mut bad = |key: &str, message: String| {
        out.push(Problem {
            key: key.into(),
            line: None,
            message,
        })
    };
    if c.proxy.listen.is_empty() {
        bad("proxy.listen", "at least one address is needed".into());
    }
    let mut all_loopback = true;
    for addr in &c.proxy.listen {
        match addr.parse::<SocketAddr>() {
            Ok(a) => all_loopback &= a.ip().is_loopback(),
            Err(_) => bad(
                "proxy.listen",
                format!("{addr:?} is not an address like \"127.0.0.1:6432\""),
            ),
        }
    }
    if c.proxy.max_message_bytes < 1024 || c.proxy.max_message_bytes > 0x3fff_ffff {
        bad(
            "proxy.max_message_bytes",
            "must be between 1024 and 1073741823".into(),
        );
    }
    if c.proxy.max_clients == 0 {
        bad("proxy.max_clients", "must be at least 1".into());
    }
    if c.proxy.worker_threads > 1024 {
        bad(
            "proxy.worker_threads",
            "must be at most 1024 (0: one per core)".into(),
        );
    }
    if c.upstream.host.is_empty() {
        bad("upstream.host", "must not be empty".into());
    }
    if c.upstream.tls.mode == UpstreamTlsMode::VerifyFull && c.upstream.tls.ca_file.is_none() {
        bad(
            "upstream.tls.ca_file",
            "verify-full needs a CA file to verify the server certificate against".into(),
        );
    }
    if let Some(f) = &c.upstream.tls.ca_file {
        check_readable(&mut bad, "upstream.tls.ca_file", f);
    }
    if c.upstream.tls.channel_binding == ChannelBinding::Require
        && c.upstream.tls.mode == UpstreamTlsMode::Disable
    {
        bad(
            "upstream.tls.channel_binding",
            "require binds the login to the server's TLS certificate: set upstream.tls.mode too"
                .into(),
        );
    }
    match &c.upstream.require_auth {
        Some(list) if list.is_empty() => bad(
            "upstream.require_auth",
            "lists no method: the proxy could not log in at all (leave it out to allow any)".into(),
        ),
        Some(list)
            if c.upstream.tls.channel_binding == ChannelBinding::Require
                && !list.contains(&UpstreamAuth::ScramSha256) =>
        {
            bad(
                "upstream.require_auth",
                "upstream.tls.channel_binding = \"require\" logs in only with SCRAM: list \
                 scram-sha-256 too"
                    .into(),
            )
        }
        _ => {}
    }
    if c.pool.max_size == 0 {
        bad("pool.max_size", "must be at least 1".into());
    }
    for (name, d) in &c.databases {
        if d.pool_size == Some(0) {
            bad(
                &format!("databases.{name}.pool_size"),
                "must be at least 1".into(),
            );
        }
    }
    for (name, u) in &c.users {
        if u.pool_size == Some(0) {
            bad(
                &format!("users.{name}.pool_size"),
                "must be at least 1".into(),
            );
        }
    }
    if c.pool.max_prepared_statements == 0 {
        bad("pool.max_prepared_statements", "must be at least 1".into());
    }
    if c.pool.min_idle > c.pool.max_size {
        bad(
            "pool.min_idle",
            format!(
                "{} is more than pool.max_size ({})",
                c.pool.min_idle, c.pool.max_size
            ),
        );
    }
    if c.pool.acquire_timeout.is_zero() {
        bad("pool.acquire_timeout", "must be more than 0".into());
    }
    if c.upstream.connect_timeout.is_zero() {
        bad("upstream.connect_timeout", "must be more than 0".into());
    }
    if !all_loopback {
        let trust_user = c
            .users
            .iter()
            .find(|(_, u)| u.method == Some(AuthMethod::Trust));
        if c.auth.method == AuthMethod::Trust {
            bad(
                "auth.method",
                "trust authentication is allowed only when every proxy.listen address is \
                 loopback; set auth.method = \"scram-sha-256\" and give users passwords"
                    .into(),
            );
        } else if let Some((name, _)) = trust_user {
            bad(
                &format!("users.{name}.method"),
                "trust authentication is allowed only when every proxy.listen address is loopback"
                    .into(),
            );
        }
    }
    for (name, u) in &c.users {
        let method = u.method.unwrap_or(c.auth.method);
        let key = format!("users.{name}.password");
        match (method, u.password.as_deref()) {
            (AuthMethod::Md5 | AuthMethod::ScramSha256, None) => bad(
                &key,
                format!("{} authentication needs a password", method.name()),
            ),
            (AuthMethod::ScramSha256, Some(p)) if crate::auth::is_md5_secret(p) => bad(
                &key,
                "an md5 secret cannot be used for scram-sha-256; give the cleartext password or a \
                 SCRAM-SHA-256$ secret"
                    .into(),
            ),
            (_, Some(p)) if p.starts_with("SCRAM-SHA-256$") => {
                if let Err(e) = crate::auth::ScramSecret::parse(p) {
                    bad(&key, e.to_string());
                }
            }
            _ => {}
        }
    }
    match c.tls.mode {
        ClientTlsMode::Disable => {}
        ClientTlsMode::Allow | ClientTlsMode::Require => {
            for (key, file) in [
                ("tls.cert_file", &c.tls.cert_file),
                ("tls.key_file", &c.tls.key_file),
            ] {
                match file {
                    None => bad(key, "needed when tls.mode is allow or require".into()),
                    Some(f) => check_readable(&mut bad, key, f),
                }
            }
        }
    }
    validate_cache(&c.cache, &mut bad);
    super::insight::validate(c, &mut bad);
    super::invalidation::validate(c, &mut bad);
    super::redis::validate(c, &mut bad);
    if let Some(a) = &c.metrics.listen {
        if a.parse::<SocketAddr>().is_err() {
            bad(
                "metrics.listen",
                format!("{a:?} is not an address like \"127.0.0.1:9930\""),
            );
        }
    }
    out
}

fn validate_cache(c: &super::CacheConfig, bad: &mut impl FnMut(&str, String)) {
    if c.enabled && c.rules.is_empty() {
        bad(
            "cache.enabled",
            "no [[cache.rules]]: nothing would be cached; add a rule or set enabled = false".into(),
        );
    }
    if c.max_entries == 0 {
        bad("cache.max_entries", "must be at least 1".into());
    }
    if c.max_entry_bytes > c.max_bytes {
        bad(
            "cache.max_entry_bytes",
            format!(
                "{} is larger than cache.max_bytes ({})",
                c.max_entry_bytes, c.max_bytes
            ),
        );
    }
    if c.default_ttl.is_zero() {
        bad("cache.default_ttl", "must be more than 0".into());
    }
    for (i, r) in c.rules.iter().enumerate() {
        if r.tables.is_empty() || r.tables.iter().any(|t| t.trim().is_empty()) {
            bad(
                &format!("cache.rules.{i}.tables"),
                "list at least one table name or glob, none empty".into(),
            );
        }
        if r.ttl.is_some_and(|t| t.is_zero()) {
            bad(
                &format!("cache.rules.{i}.ttl"),
                "must be more than 0".into(),
            );
        }
    }
}

fn check_readable(bad: &mut impl FnMut(&str, String), key: &str, file: &str) {
    if let Err(e) = std::fs::metadata(file) {
        bad(key, format!("cannot read {file:?}: {e}"));
    }
}

/// 1-based line of byte offset `at`.
fn line_at(src: &str, at: usize) -> usize {
    src[..at.min(src.len())].matches('\n').count() + 1
}

/// Line of a dotted key in the file (the deepest part of the path that is present).
pub fn line_of(src: &str, key: &str) -> Option<usize> {
    let doc = toml_edit::Document::parse(src).ok()?;
    let mut table: &dyn toml_edit::TableLike = doc.as_table();
    let mut found = None;
    let mut parts = key.split('.').peekable();
    while let Some(part) = parts.next() {
        let Some((k, item)) = table.get_key_value(part) else {
            break;
        };
        if let Some(span) = k.span().or_else(|| item.span()) {
            found = Some(line_at(src, span.start));
        }
        // `cache.rules.1.ttl`: the second `[[cache.rules]]` table.
        if let Some(tables) = item.as_array_of_tables() {
            let Some(t) = parts
                .next()
                .and_then(|i| i.parse().ok())
                .and_then(|i| tables.get(i))
            else {
                break;
            };
            if let Some(span) = t.span() {
                found = Some(line_at(src, span.start));
            }
            table = t;
            continue;
        }
        match item.as_table_like() {
            Some(t) => table = t,
            None => break,
        }
    }
    found
}

/// Deserialize `src`, reporting every type error and unknown key, not only the first: serde stops
/// at one, so each offending key is reported, removed from a copy of the document, and the rest
/// deserialized again. Returns the problems and the config of what remained (for the semantic
/// checks), or no config when the file is not TOML at all.
fn parse_all(src: &str) -> (Vec<Problem>, Option<Config>) {
    let mut problems = Vec::new();
    let mut text = src.to_string();
    // Bounded: each round removes one key.
    for _ in 0..256 {
        let e = match toml::from_str::<Config>(&text) {
            Ok(config) => return (problems, Some(config)),
            Err(e) => e,
        };
        let path = e.span().and_then(|s| key_at(&text, s.start));
        let Some(path) = path else {
            problems.push(Problem {
                key: key_from_message(e.message()),
                line: e.span().map(|s| line_at(&text, s.start)),
                message: e.message().trim().to_string(),
            });
            return (problems, None);
        };
        let key = path.join(".");
        problems.push(Problem {
            line: line_of(src, &key),
            key,
            message: e.message().trim().to_string(),
        });
        let Ok(mut doc) = text.parse::<toml_edit::DocumentMut>() else {
            return (problems, None);
        };
        let mut table: &mut dyn toml_edit::TableLike = doc.as_table_mut();
        for part in &path[..path.len() - 1] {
            match table.get_mut(part).and_then(|i| i.as_table_like_mut()) {
                Some(t) => table = t,
                None => return (problems, None),
            }
        }
        if table.remove(&path[path.len() - 1]).is_none() {
            return (problems, None);
        }
        text = doc.to_string();
    }
    (problems, None)
}

/// The dotted path of the key whose name or value contains byte offset `at`, deepest first.
fn key_at(src: &str, at: usize) -> Option<Vec<String>> {
    fn walk(table: &dyn toml_edit::TableLike, at: usize, path: &mut Vec<String>) -> bool {
        let names: Vec<String> = table.iter().map(|(k, _)| k.to_string()).collect();
        for name in names {
            let Some((key, item)) = table.get_key_value(&name) else {
                continue;
            };
            path.push(name);
            if let Some(inner) = item.as_table_like() {
                if walk(inner, at, path) {
                    return true;
                }
            }
            let hit = |span: Option<std::ops::Range<usize>>| span.is_some_and(|s| s.contains(&at));
            if hit(key.span()) || (item.as_table_like().is_none() && hit(item.span())) {
                return true;
            }
            path.pop();
        }
        false
    }
    let doc = toml_edit::Document::parse(src).ok()?;
    let mut path = Vec::new();
    walk(doc.as_table(), at, &mut path).then_some(path)
}

/// toml's messages name the offending key in backquotes; keep it as the problem's key.
fn key_from_message(msg: &str) -> String {
    msg.split('`')
        .nth(1)
        .filter(|k| {
            !k.is_empty()
                && k.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'.')
        })
        .map(str::to_string)
        .unwrap_or_else(|| "(syntax)".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(src: &str, env: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let env: Vec<(String, String)> = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        load_str(src, "test.toml", env.into_iter())
    }

    #[test]
    fn empty_file_gives_defaults() {
        let c = load("", &[]).unwrap();
        assert_eq!(c.pool.max_size, 20);
        assert_eq!(c.proxy.listen, vec!["127.0.0.1:6432".to_string()]);
    }

    #[test]
    fn type_error_names_line() {
        let e = load("[pool]\n\nmax_size = \"many\"\n", &[]).unwrap_err();
        assert_eq!(e.problems.len(), 1);
        assert_eq!(e.problems[0].line, Some(3));
    }

    #[test]
    fn unknown_key_is_an_error() {
        let e = load("[pool]\nmax_sise = 3\n", &[]).unwrap_err();
        assert_eq!(e.problems[0].line, Some(2));
        assert!(e.problems[0].message.contains("max_sise"), "{e}");
    }

    /// (key, line) of every problem.
    fn problem_keys(e: &ConfigError) -> Vec<(&str, Option<usize>)> {
        e.problems
            .iter()
            .map(|p| (p.key.as_str(), p.line))
            .collect()
    }

    #[test]
    fn every_semantic_problem_is_reported_with_its_line() {
        let src = "[proxy]\nlisten = [\"0.0.0.0:6432\"]\n\n[pool]\nmax_size = 0\nmin_idle = 4\n";
        let e = load(src, &[]).unwrap_err();
        let keys = problem_keys(&e);
        assert!(keys.contains(&("pool.max_size", Some(5))), "{e}");
        assert!(keys.contains(&("pool.min_idle", Some(6))), "{e}");
        // trust on a non-loopback address is refused; the key is not in the file.
        assert!(keys.contains(&("auth.method", None)), "{e}");
    }

    #[test]
    fn channel_binding_required_without_tls_is_refused() {
        let src = "[upstream.tls]\nmode = \"disable\"\nchannel_binding = \"require\"\n";
        let e = load(src, &[]).unwrap_err();
        assert_eq!(
            problem_keys(&e),
            vec![("upstream.tls.channel_binding", Some(3))],
            "{e}"
        );
        let c = load(
            "[upstream.tls]\nmode = \"require\"\nchannel_binding = \"disable\"\n",
            &[],
        );
        assert_eq!(
            c.unwrap().upstream.tls.channel_binding,
            ChannelBinding::Disable
        );
        let e = load("[upstream.tls]\nchannel_binding = \"maybe\"\n", &[]).unwrap_err();
        assert_eq!(e.problems[0].line, Some(2), "{e}");
    }

    #[test]
    fn cache_rule_problems_name_the_rule_and_line() {
        let src = "[cache]\nenabled = true\nmax_entry_bytes = 10\nmax_bytes = 5\n\n\
                   [[cache.rules]]\ntables = [\"a\"]\n\n[[cache.rules]]\ntables = []\nttl = \"0s\"\n";
        let e = load(src, &[]).unwrap_err();
        let keys = problem_keys(&e);
        assert!(keys.contains(&("cache.max_entry_bytes", Some(3))), "{e}");
        assert!(keys.contains(&("cache.rules.1.tables", Some(10))), "{e}");
        assert!(keys.contains(&("cache.rules.1.ttl", Some(11))), "{e}");
        let e = load("[cache]\nenabled = true\n", &[]).unwrap_err();
        assert_eq!(e.problems[0].key, "cache.enabled");
        let e = load("[[cache.rules]]\ntables = [\"a\"]\nttl = \"soon\"\n", &[]).unwrap_err();
        assert_eq!(e.problems[0].line, Some(3), "{e}");
    }

    #[test]
    fn env_overrides_keys() {
        let c = load(
            "[upstream]\npassword = \"file\"\n",
            &[
                ("PGCACHE_UPSTREAM_PASSWORD", "123"),
                ("PGCACHE_POOL_MAX_SIZE", "7"),
                ("PGCACHE_UPSTREAM_TLS_MODE", "require"),
                ("PGCACHE_LOG", "whatever"),
            ],
        )
        .unwrap();
        assert_eq!(c.upstream.password.as_deref(), Some("123"));
        assert_eq!(c.pool.max_size, 7);
        assert_eq!(c.upstream.tls.mode, UpstreamTlsMode::Require);
    }

    #[test]
    fn env_overrides_named_sections_and_insight() {
        let c = load(
            "[users.app_rw]\nmethod = \"scram-sha-256\"\n",
            &[
                ("PGCACHE_USERS_APP_RW_PASSWORD", "s3cret"),
                ("PGCACHE_USERS_APP_RW_SERVER_PASSWORD", "up"),
                ("PGCACHE_DATABASES_SHOP_DBNAME", "shop_live"),
                ("PGCACHE_SLOW_QUERY_THRESHOLD", "2s"),
                ("PGCACHE_INSIGHT_REPEAT_THRESHOLD", "0"),
            ],
        )
        .unwrap();
        let u = &c.users["app_rw"];
        assert_eq!(u.password.as_deref(), Some("s3cret"));
        assert_eq!(u.server_password.as_deref(), Some("up"));
        assert_eq!(c.databases["shop"].dbname.as_deref(), Some("shop_live"));
        assert_eq!(c.slow_query.threshold.as_secs(), 2);
        assert_eq!(c.insight.repeat_threshold, 0);
        let e = load("", &[("PGCACHE_SLOW_QUERY_THRESHOLD", "banana")]).unwrap_err();
        assert!(
            e.to_string().contains("PGCACHE_SLOW_QUERY_THRESHOLD"),
            "{e}"
        );
        let e = load("", &[("PGCACHE_USERS_APP_COLOUR", "red")]).unwrap_err();
        assert!(e.to_string().contains("PGCACHE_USERS_<NAME>_<KEY>"), "{e}");
    }

    #[test]
    fn bad_env_override_names_variable() {
        let e = load("", &[("PGCACHE_POOL_MAX_SIZE", "lots")]).unwrap_err();
        assert!(
            e.problems[0].message.contains("PGCACHE_POOL_MAX_SIZE"),
            "{e}"
        );
    }

    #[test]
    fn durations_parse() {
        let c = load(
            "[pool]\nacquire_timeout = \"250ms\"\nidle_timeout = \"0\"\n",
            &[],
        )
        .unwrap();
        assert_eq!(c.pool.acquire_timeout.as_millis(), 250);
        assert!(c.pool.idle_timeout.is_zero());
        let e = load("[pool]\nacquire_timeout = \"soon\"\n", &[]).unwrap_err();
        assert_eq!(e.problems[0].line, Some(2));
    }

    #[test]
    fn scram_with_md5_secret_is_refused() {
        let src = "[users.a]\npassword = \"md5abcdefabcdefabcdefabcdefabcdefab\"\nmethod = \"scram-sha-256\"\n";
        let e = load(src, &[]).unwrap_err();
        assert_eq!(e.problems[0].key, "users.a.password");
        assert_eq!(e.problems[0].line, Some(2));
    }
}
