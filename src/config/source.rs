//! Where the configuration comes from: the file (or defaults), environment overrides, then the
//! command-line flags on top. Kept whole so a reload reads the same sources again.

use super::{
    load_file, load_str, validate, Config, ConfigError, PoolMode, Problem, UpstreamTlsMode,
};
use std::path::PathBuf;

/// Command-line flags that override the file.
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    pub listen: Vec<String>,
    /// `postgres://user:password@host:port/database?sslmode=...`
    pub upstream: Option<String>,
    pub metrics_listen: Option<String>,
    pub pool_mode: Option<PoolMode>,
    pub pool_size: Option<u32>,
    /// `--cache-all`: caching on, plus a rule for every table.
    pub cache_all: bool,
    /// `--wal-invalidation`: the change stream on, default slot and publication names.
    pub wal_invalidation: bool,
    /// `--redis URL`: the shared tier and bus.
    pub redis: Option<String>,
}

#[derive(Debug, Clone, Default)]
pub struct Source {
    pub path: Option<PathBuf>,
    pub overrides: Overrides,
}

impl Source {
    /// The file (or defaults), then command-line overrides, then validation of the result.
    pub fn load(&self) -> Result<Config, ConfigError> {
        let mut config = match &self.path {
            Some(path) => load_file(path)?,
            None => load_str("", "defaults", std::env::vars())?,
        };
        let o = &self.overrides;
        if !o.listen.is_empty() {
            config.proxy.listen = o.listen.clone();
        }
        if let Some(m) = &o.metrics_listen {
            config.metrics.listen = Some(m.clone());
        }
        if let Some(m) = o.pool_mode {
            config.pool.mode = m;
        }
        if let Some(n) = o.pool_size {
            config.pool.max_size = n;
        }
        if o.cache_all {
            config.cache.enabled = true;
            config.cache.rules.push(super::CacheRule {
                tables: vec!["*".into()],
                ..super::CacheRule::default()
            });
        }
        if let Some(url) = &o.redis {
            config.cache.redis.url = Some(url.clone());
        }
        if o.wal_invalidation {
            config.invalidation.replication.enabled = true;
        }
        if let Some(u) = &o.upstream {
            apply_upstream_url(&mut config, u).map_err(|message| ConfigError {
                origin: "command line".into(),
                problems: vec![Problem {
                    key: "--upstream".into(),
                    line: None,
                    message,
                }],
            })?;
        }
        let problems = validate(&config);
        if problems.is_empty() {
            return Ok(config);
        }
        let origin = match &self.path {
            Some(p) => format!("{} with command-line flags", p.display()),
            None => "command line".into(),
        };
        Err(ConfigError { origin, problems })
    }
}

fn apply_upstream_url(config: &mut Config, raw: &str) -> Result<(), String> {
    let url = url::Url::parse(raw).map_err(|e| format!("{raw:?} is not a URL: {e}"))?;
    if !matches!(url.scheme(), "postgres" | "postgresql") {
        return Err(format!(
            "scheme must be postgres://, not {}://",
            url.scheme()
        ));
    }
    let decode = |s: &str| {
        url::form_urlencoded::parse(format!("x={s}").as_bytes())
            .next()
            .map(|(_, v)| v.into_owned())
            .unwrap_or_default()
    };
    let up = &mut config.upstream;
    if let Some(host) = url.host_str() {
        up.host = host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_string();
    }
    if let Some(port) = url.port() {
        up.port = port;
    }
    if !url.username().is_empty() {
        up.user = Some(decode(url.username()));
    }
    if let Some(p) = url.password() {
        up.password = Some(decode(p));
    }
    let db = url.path().trim_start_matches('/');
    if !db.is_empty() {
        up.database = Some(decode(db));
    }
    for (k, v) in url.query_pairs() {
        match (k.as_ref(), v.as_ref()) {
            ("sslmode", "disable") => up.tls.mode = UpstreamTlsMode::Disable,
            ("sslmode", "prefer" | "allow") => up.tls.mode = UpstreamTlsMode::Prefer,
            ("sslmode", "require" | "verify-ca") => up.tls.mode = UpstreamTlsMode::Require,
            ("sslmode", "verify-full") => up.tls.mode = UpstreamTlsMode::VerifyFull,
            ("sslrootcert", f) => up.tls.ca_file = Some(f.to_string()),
            (k, v) => return Err(format!("unsupported URL parameter {k}={v}")),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn url_sets_upstream() {
        let s = Source {
            path: None,
            overrides: Overrides {
                upstream: Some("postgres://u%40x:p%3Aw@db.local:5433/app?sslmode=require".into()),
                pool_mode: Some(PoolMode::Session),
                pool_size: Some(3),
                ..Overrides::default()
            },
        };
        let c = s.load().unwrap();
        assert_eq!(c.upstream.host, "db.local");
        assert_eq!(c.upstream.port, 5433);
        assert_eq!(c.upstream.user.as_deref(), Some("u@x"));
        assert_eq!(c.upstream.password.as_deref(), Some("p:w"));
        assert_eq!(c.upstream.database.as_deref(), Some("app"));
        assert_eq!(c.upstream.tls.mode, UpstreamTlsMode::Require);
        assert_eq!(c.pool.mode, PoolMode::Session);
        assert_eq!(c.pool.max_size, 3);
    }

    #[test]
    fn bad_url_is_a_problem() {
        let s = Source {
            path: None,
            overrides: Overrides {
                upstream: Some("mysql://x".into()),
                ..Overrides::default()
            },
        };
        let e = s.load().unwrap_err();
        assert_eq!(e.problems[0].key, "--upstream");
    }
}
