use std::process::Command;

use pgtenant::tenancy::crypto::{role_owner, CryptoError};
use pgtenant::tenancy::store::RegistryError;

use crate::support::*;

#[tokio::test]
async fn registry_round_trip_keeps_every_field() {
    let f = fixture();
    let reg = f.registry("rt").await;
    let out = reg.cli_stdin(
        &[
            "tenant",
            "create",
            "rt-one",
            "--tier",
            "schema",
            "--password-stdin",
            "--display-name",
            "Round Trip Bank",
            "--pool-size",
            "3",
            "--min-idle",
            "1",
            "--query-wait-timeout",
            "9",
            "--max-client-connections",
            "7",
            "--param",
            "TimeZone=Europe/Paris",
            "--limit",
            "statement_timeout=7s",
            "--json",
        ],
        PASSWORD,
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let out = reg.cli(&["tenant", "show", "rt-one", "--json"]);
    let v: serde_json::Value = serde_json::from_str(&stdout(&out)).expect("json");
    assert_eq!(v["display_name"], "Round Trip Bank");
    assert_eq!(v["tier"], "schema");
    let names = reg.names("rt-one").await;
    let schema = names.schema.clone().expect("a schema");
    assert_eq!(v["schema"], schema.as_str());
    assert!(!schema.contains("rt"), "an opaque name: {schema}");
    assert_eq!(v["pool_size"], 3);
    assert_eq!(v["pool_min_idle"], 1);
    assert_eq!(v["query_wait_timeout"], 9);
    assert_eq!(v["max_client_connections"], 7);
    assert_eq!(v["params"]["TimeZone"], "Europe/Paris");
    assert_eq!(v["limits"]["statement_timeout"], "7s");
    assert_eq!(v["status"], "active");
    assert_eq!(v["backend_roles"][0]["name"], names.role.as_str());
    assert_eq!(v["users"][0]["name"], "app");

    // And the proxy serves exactly that.
    let proxy = f.proxy(reg.config.clone());
    let t = proxy.ctx.registry.tenant("rt-one").expect("served");
    assert_eq!(t.pool_size, 3);
    assert_eq!(t.min_idle, Some(1));
    assert_eq!(t.max_client_connections, Some(7));
    let c = connect(proxy.addr, "rt-one").await.expect("connect");
    let row = c
        .query_one(
            "SELECT current_user::text, current_setting('TimeZone'), current_schemas(false)::text,
                    current_setting('statement_timeout')",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>(0), names.role);
    assert_eq!(row.get::<_, String>(1), "Europe/Paris");
    assert_eq!(row.get::<_, String>(2), format!("{{{schema},public}}"));
    assert_eq!(row.get::<_, String>(3), "7s");
}

#[tokio::test]
async fn a_dump_of_the_registry_contains_no_password_or_key() {
    let f = fixture();
    let reg = f.registry("dump").await;
    let out = reg.cli_stdin(
        &[
            "server",
            "add",
            "other",
            "--host",
            "127.0.0.1",
            "--port",
            "1",
            "--admin-password-stdin",
        ],
        "admin-secret-Zk2",
    );
    assert!(out.status.success(), "{}", stderr(&out));
    reg.create("dump-a", "database");
    reg.create("dump-b", "row");
    let store = reg.store().await;
    let mut secrets = vec![PASSWORD.to_string(), "admin-secret-Zk2".to_string()];
    let row_role = format!("{}.app", reg.config.registry.as_ref().unwrap().row_database);
    let dump_a_role = reg.names("dump-a").await.role;
    for (t, role) in [
        ("dump-a", dump_a_role.as_str()),
        ("dump-b", row_role.as_str()),
    ] {
        let p = store
            .role_password(t, role)
            .await
            .unwrap()
            .expect("role password");
        secrets.push(p.expose().to_string());
    }
    secrets.push(
        std::fs::read_to_string(reg.path("key"))
            .unwrap()
            .trim()
            .to_string(),
    );
    let dump = Command::new(f.pg_dump())
        .args(["-h", &f.host, "-p", &f.port.to_string(), "-U", "postgres"])
        .arg(format!("reg_{}", reg.name))
        .output()
        .unwrap();
    assert!(dump.status.success(), "{}", stderr(&dump));
    let text = String::from_utf8_lossy(&dump.stdout);
    assert!(text.contains("dump-a"), "the dump has the tenants");
    for s in &secrets {
        assert!(
            !text.contains(s.as_str()),
            "the registry dump holds a secret in clear text"
        );
    }
}

#[tokio::test]
async fn a_password_copied_to_another_tenant_fails_with_a_clear_error() {
    let f = fixture();
    let reg = f.registry("copy").await;
    reg.create("copy-a", "database");
    reg.create("copy-b", "database");
    let store = reg.store().await;
    store
        .client
        .execute(
            "UPDATE pgtenant.backend_roles SET password =
                 (SELECT password FROM pgtenant.backend_roles WHERE tenant_id = 'copy-a')
             WHERE tenant_id = 'copy-b'",
            &[],
        )
        .await
        .unwrap();
    let e = store
        .role_password("copy-b", &reg.names("copy-b").await.role)
        .await
        .unwrap_err();
    assert!(
        matches!(e, RegistryError::Crypto(CryptoError::Forged { .. })),
        "{e}"
    );
    assert!(e.to_string().contains("copied from another tenant"), "{e}");

    // The proxy serves the other tenant and refuses this one with a reason, not garbage.
    let proxy = f.proxy(reg.config.clone());
    connect(proxy.addr, "copy-a")
        .await
        .expect("the intact tenant works");
    let e = connect(proxy.addr, "copy-b").await.unwrap_err();
    assert_eq!(sqlstate(&e).as_deref(), Some("58000"), "{e:?}");
    let msg = e.as_db_error().unwrap().message().to_string();
    assert!(msg.contains("cannot be decrypted"), "{msg}");
}

#[tokio::test]
async fn a_tampered_password_fails_with_a_clear_error() {
    let f = fixture();
    let reg = f.registry("tamper").await;
    reg.create("tamper-a", "database");
    let store = reg.store().await;
    // Flip one character of the ciphertext body.
    store
        .client
        .execute(
            "UPDATE pgtenant.backend_roles
             SET password = left(password, length(password) - 3)
                 || CASE WHEN substr(password, length(password) - 2, 1) = 'A' THEN 'B' ELSE 'A' END
                 || right(password, 2)
             WHERE tenant_id = 'tamper-a'",
            &[],
        )
        .await
        .unwrap();
    let e = store
        .role_password("tamper-a", &reg.names("tamper-a").await.role)
        .await
        .unwrap_err();
    assert!(e.to_string().contains("fails authentication"), "{e}");
}

#[tokio::test]
async fn a_wrong_master_key_names_the_key_it_needs() {
    let f = fixture();
    let reg = f.registry("wrongkey").await;
    reg.create("wrongkey-a", "database");
    let sealed: String = reg
        .store()
        .await
        .client
        .query_one(
            "SELECT password FROM pgtenant.backend_roles WHERE tenant_id = 'wrongkey-a'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    let other = pgtenant::tenancy::crypto::Keyring::new(
        pgtenant::tenancy::crypto::MasterKey::from_bytes(&[42; 32]),
        vec![],
    );
    let e = other
        .open(
            &role_owner("wrongkey-a", &reg.names("wrongkey-a").await.role),
            &sealed,
        )
        .unwrap_err();
    let needed = pgtenant::tenancy::crypto::Keyring::key_id_of(&sealed)
        .unwrap()
        .to_string();
    assert!(matches!(e, CryptoError::UnknownKey { .. }));
    assert!(e.to_string().contains(&needed), "{e}");
}

#[tokio::test]
async fn key_rotation_under_a_running_proxy_keeps_clients_working() {
    let f = fixture();
    let reg = f.registry("rotate").await;
    reg.create("rotate-a", "database");
    let old_id = reg.store().await.keys.current_id().to_string();
    // The proxy names the next key's file before it exists, and is never restarted.
    let mut proxy_config = reg.config.clone();
    let r = proxy_config.registry.as_mut().unwrap();
    r.old_keys = vec![format!("file:{}", reg.path("key.new").display())];
    let proxy = f.proxy(proxy_config);
    let during = connect(proxy.addr, "rotate-a")
        .await
        .expect("connect before");
    let new_key = pgtenant::tenancy::crypto::MasterKey::generate_text();
    std::fs::write(reg.path("key.new"), &new_key).unwrap();

    // The CLI's config now names the new key as current and the old one as old.
    let text = std::fs::read_to_string(&reg.config_path).unwrap().replace(
        "key = \"file:key\"",
        "key = \"file:key.new\"\nold_keys = [\"file:key\"]",
    );
    std::fs::write(&reg.config_path, text).unwrap();
    let before = proxy.ctx.registry.tenant("rotate-a").expect("served");
    let out = reg.cli(&["registry", "rotate-key"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stdout(&out).contains("0 left under other keys"),
        "{}",
        stdout(&out)
    );
    let out = reg.cli(&["registry", "status", "--json"]);
    let v: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
    let ids: Vec<String> = v["values_by_key"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k["key_id"].as_str().unwrap().to_string())
        .collect();
    assert!(
        !ids.contains(&old_id),
        "nothing is left under the old key: {ids:?}"
    );

    // The open client keeps working.
    during
        .simple_query("SELECT 1")
        .await
        .expect("client across the rotation");
    // The re-sealed entry reached the proxy (a new snapshot entry) and opened.
    eventually(
        "the rotation never reached the proxy",
        std::time::Duration::from_secs(3),
        || {
            let t = proxy.ctx.registry.tenant("rotate-a").expect("still served");
            !std::sync::Arc::ptr_eq(&t, &before)
        },
    )
    .await;
    let t = proxy.ctx.registry.tenant("rotate-a").expect("still served");
    assert!(
        t.unavailable.is_none(),
        "the proxy opened the re-sealed password"
    );
    // Fresh backends are opened with the password the proxy read from the re-sealed entry.
    let role = reg.names("rotate-a").await.role;
    f.admin("postgres")
        .await
        .execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = $1",
            &[&role],
        )
        .await
        .unwrap();
    for _ in 0..3 {
        let c = connect_within(proxy.addr, "rotate-a", std::time::Duration::from_secs(3))
            .await
            .expect("connect after");
        c.simple_query("SELECT 1").await.expect("a fresh backend");
    }
}

#[tokio::test]
async fn the_server_log_never_sees_a_tenant_password() {
    let f = fixture();
    let admin = f.admin("postgres").await;
    admin
        .batch_execute("ALTER SYSTEM SET log_statement = 'ddl'")
        .await
        .unwrap();
    admin
        .batch_execute("SELECT pg_reload_conf()")
        .await
        .unwrap();
    let reg = f.registry("srvlog").await;
    reg.create("srvlog-a", "schema");
    let out = reg.cli(&["tenant", "update", "srvlog-a", "--rotate-password"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let role = reg.names("srvlog-a").await.role;
    let password = reg
        .store()
        .await
        .role_password("srvlog-a", &role)
        .await
        .unwrap()
        .expect("role password");
    let log = std::fs::read_to_string(&f.server_log).unwrap();
    assert!(log.contains(&format!("ROLE \"{role}\"")), "DDL is logged");
    assert!(
        !log.contains(password.expose()),
        "the server log holds the tenant's password"
    );
}

/// README's "Key rotation" steps, done as written while a proxy runs, then a proxy started
/// on the final config: a tenant of every tier connects through both.
#[tokio::test]
async fn the_documented_key_rotation_keeps_every_tier_up_through_a_restart() {
    let f = fixture();
    let reg = f.registry("keyrot").await;
    let tenants = [
        ("keyrot-db", "database"),
        ("keyrot-sc", "schema"),
        ("keyrot-rw", "row"),
    ];
    for (id, tier) in tenants {
        reg.create(id, tier);
    }
    // Step 1: a new key, named ahead of time in the running proxy's old_keys.
    let mut running_config = reg.config.clone();
    running_config.registry.as_mut().unwrap().old_keys =
        vec![format!("file:{}", reg.path("new.key").display())];
    let running = f.proxy(running_config);
    for (id, _) in tenants {
        connect(running.addr, id)
            .await
            .expect("before the rotation");
    }
    let out = reg.cli(&["registry", "gen-key"]);
    assert!(out.status.success(), "{}", stderr(&out));
    std::fs::write(reg.path("new.key"), stdout(&out).trim()).unwrap();
    // Step 2: the new key current, the old one old, then rotate-key.
    let original = std::fs::read_to_string(&reg.config_path).unwrap();
    let rotating = original.replace(
        "key = \"file:key\"",
        "key = \"file:new.key\"\nold_keys = [\"file:key\"]",
    );
    assert_ne!(
        rotating, original,
        "the config names its key as README shows"
    );
    std::fs::write(&reg.config_path, &rotating).unwrap();
    let out = reg.cli(&["registry", "rotate-key"]);
    assert!(out.status.success(), "{}", stderr(&out));
    // Step 3: the old key dropped.
    let after = original.replace("key = \"file:key\"", "key = \"file:new.key\"");
    std::fs::write(&reg.config_path, &after).unwrap();

    for (id, tier) in tenants {
        let c = connect_within(running.addr, id, std::time::Duration::from_secs(3))
            .await
            .unwrap_or_else(|e| panic!("{tier} tenant through the running proxy: {e}"));
        c.simple_query("SELECT 1").await.expect("running proxy");
    }
    let restarted = f.proxy(pgtenant::config::Config::load(&reg.config_path).unwrap());
    for (id, tier) in tenants {
        let c = connect(restarted.addr, id)
            .await
            .unwrap_or_else(|e| panic!("{tier} tenant through a restarted proxy: {e}"));
        let n: i64 = c
            .query_one("SELECT count(*) FROM accounts", &[])
            .await
            .unwrap_or_else(|e| panic!("{tier} tenant's table: {e}"))
            .get(0);
        assert!(n >= 0);
    }
}
