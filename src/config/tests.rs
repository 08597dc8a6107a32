//! Configuration loading: precedence, errors, secrets.
use super::*;

fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

fn write(dir: &tempfile::TempDir, name: &str, text: &str) -> PathBuf {
    let p = dir.path().join(name);
    std::fs::write(&p, text).unwrap();
    p
}

#[test]
fn the_embedded_default_loads_and_matches_the_struct_defaults() {
    let cfg = Config::load_with(&Source::Embedded, &[], None).unwrap();
    let defaults = Config::default();
    assert_eq!(
        cfg.to_toml(),
        defaults.to_toml(),
        "config/gateway.toml drifted from the Default impls"
    );
    assert_eq!(cfg.mqtt.port, 1883);
    assert!(!cfg.golioth.enabled && !cfg.netneural.enabled);
}

#[test]
fn environment_overrides_file_which_overrides_defaults() {
    let dir = tempfile::tempdir().unwrap();
    let file = write(
        &dir,
        "g.toml",
        "[mqtt]\nport = 1884\nclient_id = \"from-file\"\n",
    );
    let cfg = Config::load_with(
        &Source::File(file),
        &env(&[("NNGW_MQTT__PORT", "18830"), ("OTHER_MQTT__PORT", "1")]),
        None,
    )
    .unwrap();
    assert_eq!(cfg.mqtt.port, 18830, "environment beats file");
    assert_eq!(cfg.mqtt.client_id, "from-file", "file beats default");
    assert_eq!(cfg.mqtt.host, "127.0.0.1", "default fills the rest");
}

#[test]
fn errors_name_the_file_the_key_and_the_value() {
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        ("[mqtt]\nprot = 1\n", "prot"),
        ("[mqtt]\nport = \"many\"\n", "mqtt.port"),
        ("[mqtt]\nport = 70000\n", "mqtt.port"),
        (
            "[gateway]\nshutdown_timeout = \"soon\"\n",
            "gateway.shutdown_timeout",
        ),
        (
            "[mqtt.topics]\nstate = \"devices/+/state\"\n",
            "mqtt.topics.state",
        ),
        (
            "[storage]\nsynchronous = \"sometimes\"\n",
            "storage.synchronous",
        ),
        ("[mqtt]\nkeep_alive = \"500ms\"\n", "mqtt.keep_alive"),
        (
            "[golioth]\nenabled = true\nproject_id = \"p\"\n",
            "golioth.api_key_file",
        ),
    ];
    for (text, key) in cases {
        let file = write(&dir, "bad.toml", text);
        let err = Config::load_with(&Source::File(file.clone()), &[], None).unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains(&file.display().to_string()),
            "{msg} should name the file"
        );
        assert!(msg.contains(key), "{msg} should name {key}");
    }
}

#[test]
fn secrets_come_from_files_or_credentials_and_never_print() {
    let dir = tempfile::tempdir().unwrap();
    let creds = tempfile::tempdir().unwrap();
    std::fs::write(creds.path().join("golioth-api-key"), "gol-SECRET-1\n").unwrap();
    std::fs::write(creds.path().join("mqtt-password"), "mqtt-SECRET-3\n").unwrap();
    let key_file = write(&dir, "nn.key", "nn-SECRET-2\n");
    let file = write(
        &dir,
        "g.toml",
        &format!(
            "[golioth]\nenabled = true\nproject_id = \"p\"\n[netneural]\nenabled = true\n\
             url = \"https://x.supabase.co\"\norganization_id = \"o\"\nintegration_id = \"i\"\napi_key_file = {:?}\n",
            key_file.display().to_string()
        ),
    );
    let cfg = Config::load_with(&Source::File(file), &[], Some(creds.path())).unwrap();
    assert_eq!(
        cfg.golioth.api_key.as_ref().unwrap().expose(),
        "gol-SECRET-1"
    );
    assert_eq!(
        cfg.netneural.api_key.as_ref().unwrap().expose(),
        "nn-SECRET-2"
    );
    let shown = format!("{}\n{:?}", cfg.to_toml(), cfg);
    assert!(!shown.contains("SECRET"), "a secret leaked: {shown}");
    assert!(shown.contains("<redacted>"));
}

#[test]
fn the_api_token_comes_from_a_credential_and_a_blank_one_is_none() {
    let creds = tempfile::tempdir().unwrap();
    let env = |bind: &str| vec![("NNGW_API__BIND".to_owned(), bind.to_owned())];
    // The unit's blank defaults: no token (the daemon makes one), no webhook.
    for name in ["api-token", "api-webhook-secret", "api-webhook-hmac-key"] {
        std::fs::write(creds.path().join(name), "\n").unwrap();
    }
    let cfg = Config::load_with(
        &Source::Embedded,
        &env("127.0.0.1:8080"),
        Some(creds.path()),
    )
    .unwrap();
    assert!(cfg.api.token.is_none() && cfg.api.webhook_secret.is_none());
    // Blank is no token: a network bind is refused, naming the key and the way out.
    let e = Config::load_with(&Source::Embedded, &env("0.0.0.0:8080"), Some(creds.path()))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("api.bind") && e.contains("NNGW_API__BIND") && e.contains("api-token"),
        "{e}"
    );
    std::fs::write(creds.path().join("api-token"), "tok-SECRET-9\n").unwrap();
    let cfg =
        Config::load_with(&Source::Embedded, &env("0.0.0.0:8080"), Some(creds.path())).unwrap();
    assert_eq!(cfg.api.token.as_ref().unwrap().expose(), "tok-SECRET-9");
    assert!(!format!("{}{cfg:?}", cfg.to_toml()).contains("SECRET"));
}

#[test]
fn a_reload_names_the_sections_that_need_a_restart() {
    let old = Config::default();
    let mut new = Config::default();
    new.log.level = "debug".into();
    assert!(old.restart_needed(&new).is_empty(), "log reloads live");
    new.mqtt.port = 1884;
    new.coap.max_concurrent = 8;
    assert_eq!(old.restart_needed(&new), ["mqtt", "coap"]);
}

#[test]
fn environment_strings_that_look_like_numbers_stay_strings() {
    let cfg = Config::load_with(
        &Source::Embedded,
        &env(&[
            ("NNGW_MQTT__CLIENT_ID", "0100"),
            ("NNGW_STORAGE__PATH", "007"),
            ("NNGW_MQTT__ENABLED", "false"),
        ]),
        None,
    )
    .unwrap();
    assert_eq!(
        cfg.mqtt.client_id, "0100",
        "a changed client id would abandon the broker session"
    );
    assert_eq!(cfg.storage.path, PathBuf::from("007"));
    assert!(!cfg.mqtt.enabled);
}

#[test]
fn a_bad_value_from_the_environment_is_blamed_on_the_variable() {
    let err = Config::load_with(
        &Source::Embedded,
        &env(&[("NNGW_MQTT__KEEP_ALIVE", "0s")]),
        None,
    )
    .unwrap_err();
    assert!(
        err.to_string()
            .starts_with("environment variable NNGW_MQTT__KEEP_ALIVE"),
        "{err}"
    );
}

/// An unknown key at the top level, in every section, in `[mqtt.topics]`, and an unknown
/// section: (file text, the variable setting the same key, the key, the table it is in).
const UNKNOWN_KEYS: &[(&str, &str, &str, Option<&str>)] = &[
    ("bogus_key = 1\n", "NNGW_BOGUS_KEY", "bogus_key", None),
    // A single underscore where `__` was meant is an unknown top-level key, not a silent no-op.
    ("mqtt_port = 1\n", "NNGW_MQTT_PORT", "mqtt_port", None),
    ("[bogus]\nkey = 1\n", "NNGW_BOGUS__KEY", "bogus", None),
    (
        "[gateway]\nbogus_key = 1\n",
        "NNGW_GATEWAY__BOGUS_KEY",
        "bogus_key",
        Some("gateway"),
    ),
    (
        "[storage]\nbogus_key = 1\n",
        "NNGW_STORAGE__BOGUS_KEY",
        "bogus_key",
        Some("storage"),
    ),
    (
        "[mqtt]\nbogus_key = 1\n",
        "NNGW_MQTT__BOGUS_KEY",
        "bogus_key",
        Some("mqtt"),
    ),
    (
        "[mqtt.topics]\nbogus_key = 1\n",
        "NNGW_MQTT__TOPICS__BOGUS_KEY",
        "bogus_key",
        Some("mqtt.topics"),
    ),
    (
        "[coap]\nbogus_key = 1\n",
        "NNGW_COAP__BOGUS_KEY",
        "bogus_key",
        Some("coap"),
    ),
    (
        "[golioth]\nbogus_key = 1\n",
        "NNGW_GOLIOTH__BOGUS_KEY",
        "bogus_key",
        Some("golioth"),
    ),
    (
        "[netneural]\nbogus_key = 1\n",
        "NNGW_NETNEURAL__BOGUS_KEY",
        "bogus_key",
        Some("netneural"),
    ),
    (
        "[log]\nbogus_key = 1\n",
        "NNGW_LOG__BOGUS_KEY",
        "bogus_key",
        Some("log"),
    ),
];

/// Asserts that `err` names `key` and, for a key inside a table, that table.
fn names_key(err: &ConfigError, key: &str, table: Option<&str>) {
    let msg = err.to_string();
    assert!(msg.contains(&format!("`{key}`")), "{msg} should name {key}");
    if let Some(table) = table {
        assert!(
            msg.contains(&format!("for key `{table}`")),
            "{msg} should name [{table}]"
        );
    }
}

#[test]
fn an_unknown_key_anywhere_in_the_file_is_an_error_naming_the_file_and_the_key() {
    let dir = tempfile::tempdir().unwrap();
    for (text, _, key, table) in UNKNOWN_KEYS {
        let file = write(&dir, "unknown.toml", text);
        let err = Config::load_with(&Source::File(file.clone()), &[], None)
            .expect_err(&format!("{text:?} was accepted"));
        assert!(
            err.to_string().contains(&file.display().to_string()),
            "{err} should name the file"
        );
        names_key(&err, key, *table);
    }
}

#[test]
fn a_mistake_in_the_file_is_pointed_at_by_its_line() {
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        ("# top\n[coap]\nbnid = \"0.0.0.0:5683\"\n", 3),
        (
            "[mqtt]\nport = 1883\n\n[mqtt.topics]\n# c\nstat = \"x/{device}\"\n",
            6,
        ),
        ("[mqtt]\nhost = \"h\"\nport = 0\n", 3),
        ("mqtt.keep_alive = 30\n", 1),
    ];
    for (text, line) in cases {
        let file = write(&dir, "lines.toml", text);
        let err = Config::load_with(&Source::File(file.clone()), &[], None)
            .expect_err(&format!("{text:?} was accepted"))
            .to_string();
        assert!(
            err.starts_with(&format!("{}:{line}: ", file.display())),
            "{text:?}: {err} should point at line {line}"
        );
    }
    // From the environment: no line (the file is not at fault).
    let err = Config::load_with(
        &Source::File(write(&dir, "ok.toml", "[mqtt]\nport = 1883\n")),
        &env(&[("NNGW_MQTT__PORT", "0")]),
        None,
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.starts_with("environment variable NNGW_MQTT__PORT"),
        "{err}"
    );
}

#[test]
fn an_unknown_key_anywhere_from_the_environment_is_an_error_naming_the_key() {
    for (_, var, key, table) in UNKNOWN_KEYS {
        let err = Config::load_with(&Source::Embedded, &env(&[(var, "1")]), None)
            .expect_err(&format!("{var}=1 was accepted"));
        names_key(&err, key, *table);
    }
}

#[test]
fn a_bad_topic_template_is_refused_at_load_naming_key_value_and_problem() {
    let dir = tempfile::tempdir().unwrap();
    let file = write(
        &dir,
        "t.toml",
        "[mqtt.topics]\nstate = \"devices/+/state\"\n",
    );
    let from_file = Config::load_with(&Source::File(file.clone()), &[], None).unwrap_err();
    let from_env = Config::load_with(
        &Source::Embedded,
        &env(&[("NNGW_MQTT__TOPICS__DESIRED", "d/{device}x/desired")]),
        None,
    )
    .unwrap_err();
    for (err, key, value, problem) in [
        (
            &from_file,
            "mqtt.topics.state",
            "devices/+/state",
            "wildcards",
        ),
        (
            &from_env,
            "mqtt.topics.desired",
            "d/{device}x/desired",
            "whole topic level",
        ),
    ] {
        let msg = err.to_string();
        for part in [key, value, problem] {
            assert!(msg.contains(part), "{msg} should contain {part:?}");
        }
    }
    assert!(from_file.to_string().contains(&file.display().to_string()));
    assert!(
        from_env
            .to_string()
            .starts_with("environment variable NNGW_MQTT__TOPICS__DESIRED"),
        "{from_env}"
    );
}

#[test]
fn topic_templates_are_held_parsed_and_written_back_as_strings() {
    let cfg = Config::load_with(
        &Source::Embedded,
        &env(&[("NNGW_MQTT__TOPICS__STATE", "site/{device}/up")]),
        None,
    )
    .unwrap();
    assert_eq!(cfg.mqtt.topics.state.filter(), "site/+/up");
    assert!(
        cfg.to_toml().contains("state = \"site/{device}/up\""),
        "{}",
        cfg.to_toml()
    );
}

#[test]
fn errors_say_what_to_write_instead() {
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        (
            "[storage]\nsynchronous = \"fsync\"\n",
            "allowed: \"full\" or \"normal\"",
        ),
        ("[coap]\nbind = \"0.0.0.0\"\n", "\"host:port\""),
        ("[mqtt]\nkeep_alive = 30\n", "\"30s\""),
        ("[log]\nformat = \"json\"\n", "\"journald\""),
    ];
    for (text, hint) in cases {
        let file = write(&dir, "g.toml", text);
        let e = Config::load_with(&Source::File(file), &[], None).unwrap_err();
        assert!(e.to_string().contains(hint), "{text:?}: {e}");
    }
    let e =
        Config::load_with(&Source::Embedded, &env(&[("NNGW_MQTT__BOGUS", "1")]), None).unwrap_err();
    assert!(
        e.origin.contains("NNGW_MQTT__BOGUS"),
        "an unknown variable is blamed on itself: {e}"
    );
}

#[test]
fn a_relative_database_path_lives_in_systemds_state_directory() {
    let cfg = Config::load_with(
        &Source::Embedded,
        &env(&[("STATE_DIRECTORY", "/var/lib/nn-gateway")]),
        None,
    )
    .unwrap();
    assert_eq!(
        cfg.storage.path,
        PathBuf::from("/var/lib/nn-gateway/data/gateway.db")
    );
    let cfg = Config::load_with(
        &Source::Embedded,
        &env(&[
            ("STATE_DIRECTORY", "/var/lib/nn-gateway"),
            ("NNGW_STORAGE__PATH", "/srv/gw.db"),
        ]),
        None,
    )
    .unwrap();
    assert_eq!(
        cfg.storage.path,
        PathBuf::from("/srv/gw.db"),
        "absolute stays"
    );
    let cfg = Config::load_with(&Source::Embedded, &[], None).unwrap();
    assert_eq!(cfg.storage.path, PathBuf::from("data/gateway.db"));
}

#[test]
fn the_sync_section_takes_strategies_and_field_policies_from_file_and_environment() {
    use crate::reconcile::{FieldRule, Strategy};
    let dir = tempfile::tempdir().unwrap();
    let file = write(
        &dir,
        "s.toml",
        "[sync]\nconflict_strategy = \"local_wins\"\n[sync.fields]\n\"/name\" = \"local_wins\"\n\
         \"/desired/firmware_version\" = \"remote_wins\"\n\"/tags\" = \"merge\"\n",
    );
    let cfg = Config::load_with(
        &Source::File(file.clone()),
        &env(&[
            ("NNGW_SYNC__INTERVAL", "15s"),
            ("NNGW_SYNC__CONFLICT_STRATEGY", "newest_wins"),
        ]),
        None,
    )
    .unwrap();
    assert_eq!(cfg.sync.interval, Duration::from_secs(15));
    let policy = cfg.sync.policy();
    assert_eq!(
        policy.strategy,
        Strategy::NewestWins,
        "environment beats file"
    );
    assert_eq!(
        policy.rule_for("/desired/firmware_version"),
        FieldRule::Strategy(Strategy::RemoteWins)
    );
    assert_eq!(policy.rule_for("/tags"), FieldRule::MergeSet);
    assert_eq!(
        policy.rule_for("/desired/led"),
        FieldRule::Strategy(Strategy::NewestWins),
        "fields without a policy follow the global strategy"
    );
    // It loads again as it prints.
    let again = write(&dir, "again.toml", &cfg.to_toml());
    let back = Config::load_with(&Source::File(again), &[], None).unwrap();
    assert_eq!(back.sync.policy(), policy);

    let bad = Config::load_with(
        &Source::File(file.clone()),
        &env(&[("NNGW_SYNC__CONFLICT_STRATEGY", "first_wins")]),
        None,
    )
    .unwrap_err();
    assert!(bad.origin.contains("NNGW_SYNC__CONFLICT_STRATEGY"), "{bad}");
    assert!(bad.to_string().contains("local_wins, remote_wins"), "{bad}");
    let field = write(&dir, "f.toml", "[sync.fields]\n\"/firmware\" = \"merge\"\n");
    let bad = Config::load_with(&Source::File(field), &[], None).unwrap_err();
    assert!(
        bad.to_string().contains("/desired/firmware_version"),
        "{bad}"
    );
}

#[test]
fn mqtt_tls_is_off_by_default_and_refuses_a_half_or_unreadable_setup_naming_key_and_file() {
    let cfg = Config::load_with(&Source::Embedded, &[], None).unwrap();
    assert!(!cfg.mqtt.tls.enabled && cfg.mqtt.tls.client.is_none());

    let dir = tempfile::tempdir().unwrap();
    let notes = write(&dir, "notes.txt", "not a certificate\n");
    let on = ("NNGW_MQTT__TLS__ENABLED", "true");
    let load = |pairs: &[(&str, &str)]| {
        Config::load_with(&Source::Embedded, &env(pairs), None).unwrap_err()
    };

    let e = load(&[on]);
    assert_eq!(e.key.as_deref(), Some("mqtt.tls.ca_file"), "{e}");
    assert!(e.to_string().contains("required"), "{e}");

    let e = load(&[on, ("NNGW_MQTT__TLS__CA_FILE", "/nonexistent/ca.pem")]);
    assert_eq!(e.key.as_deref(), Some("mqtt.tls.ca_file"), "{e}");
    assert!(
        e.to_string().contains("/nonexistent/ca.pem") && e.to_string().contains("cannot read"),
        "{e}"
    );
    // Blamed on the variable that set it.
    assert!(e.origin.contains("NNGW_MQTT__TLS__CA_FILE"), "{e}");

    let e = load(&[on, ("NNGW_MQTT__TLS__CA_FILE", notes.to_str().unwrap())]);
    assert!(e.to_string().contains("no certificate in it"), "{e}");

    let e = load(&[
        on,
        ("NNGW_MQTT__TLS__CA_FILE", notes.to_str().unwrap()),
        ("NNGW_MQTT__TLS__KEY_FILE", "/etc/nn-gateway/client.key"),
    ]);
    assert_eq!(e.key.as_deref(), Some("mqtt.tls.cert_file"), "{e}");
    assert!(e.to_string().contains("set both or neither"), "{e}");

    let e = load(&[
        on,
        ("NNGW_MQTT__TLS__CA_FILE", notes.to_str().unwrap()),
        ("NNGW_MQTT__TLS__SERVER_NAME", "not a name"),
    ]);
    assert_eq!(e.key.as_deref(), Some("mqtt.tls.server_name"), "{e}");

    // With the broker off, nothing is read.
    let cfg = Config::load_with(
        &Source::Embedded,
        &env(&[on, ("NNGW_MQTT__ENABLED", "false")]),
        None,
    )
    .unwrap();
    assert!(cfg.mqtt.tls.client.is_none());
}
