//! `PGCACHE_<SECTION>_<KEY>` environment overrides: which variables name which keys, and how a
//! value is fitted to its key's type.

use super::load::Problem;
use super::Config;

const SECTIONS: [&str; 13] = [
    "proxy",
    "upstream",
    "pool",
    "auth",
    "tls",
    "metrics",
    "admin",
    "cache",
    "insight",
    "slow_query",
    "users",
    "databases",
    "invalidation",
];

/// Keys of `[users.NAME]` and `[databases.NAME]`: `PGCACHE_USERS_APP_RW_PASSWORD` is user
/// `app_rw`'s `password` (the longest key that ends the variable wins).
const NAMED_KEYS: [&str; 7] = [
    "password",
    "method",
    "server_user",
    "server_password",
    "pool_mode",
    "pool_size",
    "dbname",
];

/// `PGCACHE_UPSTREAM_PASSWORD=x` sets `upstream.password`; `PGCACHE_UPSTREAM_TLS_MODE` sets
/// `upstream.tls.mode`. A value is tried as a string first, then as a TOML literal (`20`, `true`,
/// `["a", "b"]`), so whichever the key's type accepts wins.
pub(super) fn apply_env(
    src: &str,
    overrides: Vec<(String, String)>,
) -> Result<Config, Vec<Problem>> {
    let mut root: toml::Table = toml::from_str(src).map_err(|e| {
        vec![Problem {
            key: "(file)".into(),
            line: None,
            message: e.to_string(),
        }]
    })?;
    let mut problems = Vec::new();
    for (var, raw) in overrides {
        let rest = var["PGCACHE_".len()..].to_ascii_lowercase();
        let Some(section) = SECTIONS.iter().find(|s| rest.starts_with(&format!("{s}_"))) else {
            continue; // not a config variable (e.g. PGCACHE_LOG)
        };
        let key = &rest[section.len() + 1..];
        let mut path = vec![section.to_string()];
        let named = NAMED_KEYS
            .iter()
            .filter(|k| key.len() > k.len() + 1 && key.ends_with(&format!("_{k}")))
            .max_by_key(|k| k.len());
        match key.split_once('_') {
            _ if matches!(*section, "users" | "databases") => {
                let Some(k) = named else {
                    problems.push(Problem {
                        key: format!("{section}.?"),
                        line: None,
                        message: format!(
                            "environment variable {var}: say PGCACHE_{}_<NAME>_<KEY> with KEY one of {}",
                            section.to_ascii_uppercase(),
                            NAMED_KEYS.join(", ")
                        ),
                    });
                    continue;
                };
                path.push(key[..key.len() - k.len() - 1].into());
                path.push(k.to_string());
            }
            Some((sub, k))
                if (*section == "upstream" && sub == "tls")
                    || (*section == "invalidation" && sub == "replication")
                    || (*section == "cache" && sub == "redis") =>
            {
                path.push(sub.into());
                path.push(k.into());
            }
            _ => path.push(key.into()),
        }
        let as_string = toml::Value::String(raw.clone());
        let as_literal = toml::from_str::<toml::Table>(&format!("v = {raw}"))
            .ok()
            .and_then(|mut t| t.remove("v"));
        let mut accepted = false;
        for candidate in std::iter::once(as_string).chain(as_literal) {
            let mut trial = root.clone();
            set_path(&mut trial, &path, candidate);
            if toml::Value::Table(trial.clone())
                .try_into::<Config>()
                .is_ok()
            {
                root = trial;
                accepted = true;
                break;
            }
        }
        if !accepted {
            let mut trial = root.clone();
            set_path(&mut trial, &path, toml::Value::String(raw));
            let err = toml::Value::Table(trial)
                .try_into::<Config>()
                .err()
                .map(|e| e.message().trim().to_string())
                .unwrap_or_default();
            problems.push(Problem {
                key: path.join("."),
                line: None,
                message: format!("from environment variable {var}: {err}"),
            });
        }
    }
    if !problems.is_empty() {
        return Err(problems);
    }
    toml::Value::Table(root).try_into::<Config>().map_err(|e| {
        vec![Problem {
            key: "(environment)".into(),
            line: None,
            message: e.message().to_string(),
        }]
    })
}

fn set_path(root: &mut toml::Table, path: &[String], value: toml::Value) {
    let mut table = root;
    for part in &path[..path.len() - 1] {
        let entry = table
            .entry(part.clone())
            .or_insert_with(|| toml::Value::Table(Default::default()));
        if !entry.is_table() {
            *entry = toml::Value::Table(Default::default());
        }
        table = entry.as_table_mut().expect("made a table above");
    }
    table.insert(path[path.len() - 1].clone(), value);
}
