//! Proves the test harness itself: a real PostgreSQL starts, its roles log in, and private
//! instances restart and serve TLS. No proxy involved.

mod support;

use support::{pg, PgOptions, PgServer};

#[tokio::test]
async fn shared_postgres_accepts_harness_roles() {
    let pg = pg();
    let client = support::connect(&pg.url("app", "app", "app")).await;
    let one: i32 = client
        .query_one("select 1", &[])
        .await
        .expect("select 1")
        .get(0);
    assert_eq!(one, 1);

    for (user, password) in support::ROLES {
        let client = support::connect(&pg.url(user, password, "app")).await;
        let who: String = client
            .query_one("select current_user::text", &[])
            .await
            .expect("current_user")
            .get(0);
        assert_eq!(&who, user);
    }
    assert!(support::try_connect(&pg.url("app", "wrong", "app"))
        .await
        .is_err());

    let secrets = pg.psql(
        "postgres",
        "select rolname || '=' || case when rolpassword like 'md5%' then 'md5' \
         else split_part(rolpassword, '$', 1) end from pg_authid \
         where rolname in ('app', 'md5user') order by 1",
    );
    assert_eq!(secrets, "app=SCRAM-SHA-256\nmd5user=md5");
    assert_eq!(pg.psql("app", "show wal_level"), "logical");
}

#[test]
fn private_postgres_restarts_and_serves_tls() {
    let server = PgServer::start_new(PgOptions { ssl: true });
    assert_eq!(server.psql("app", "select 2"), "2");
    server.stop();
    assert!(std::net::TcpStream::connect(("127.0.0.1", server.port)).is_err());
    server.start();

    // libpq verifies the chain and the IP SAN against the harness CA.
    let conninfo = format!(
        "host=127.0.0.1 port={} user=app password=app dbname=app sslmode=verify-full sslrootcert={}",
        server.port,
        server.ca_pem_path().display()
    );
    let out = std::process::Command::new("psql")
        .args([
            "-X",
            "-A",
            "-t",
            "-c",
            "select ssl from pg_stat_ssl where pid = pg_backend_pid()",
        ])
        .arg(conninfo)
        .output()
        .expect("run psql");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "t");

    let data_dir = server.data_dir.clone();
    drop(server);
    assert!(!data_dir.exists(), "drop removes a private instance");
}

#[test]
fn proxy_config_merges_extra_over_base() {
    let pg = pg();
    let rendered = support::proxy_config(
        pg,
        7000,
        "[pool]\nmode = \"transaction\"\n[cache]\nttl = \"1s\"\n",
    );
    let table: toml::Table = rendered.parse().expect("rendered config is TOML");
    assert_eq!(table["pool"]["mode"].as_str(), Some("transaction"));
    assert_eq!(table["pool"]["max_size"].as_integer(), Some(20));
    assert_eq!(table["cache"]["ttl"].as_str(), Some("1s"));
    assert_eq!(
        table["upstream"]["port"].as_integer(),
        Some(i64::from(pg.port))
    );
    assert_eq!(table["proxy"]["listen"][0].as_str(), Some("127.0.0.1:7000"));
}
