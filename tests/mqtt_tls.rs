//! MQTT over TLS (`[mqtt.tls]`): the gateway against Mosquitto TLS listeners, with a CA and
//! certificates made by the openssl CLI for each test: the right CA and name connect, both
//! ways of data flow work, client certificates are required and checked, and a wrong name,
//! an unknown CA, an expired certificate and a missing client certificate are refused with an
//! error that names the problem (in `status`'s heartbeat and in the daemon's log); TLS to a
//! plain listener is `down`, its error suspecting the port. Files the
//! loader cannot use are refused by `check-config` with EX_CONFIG, naming the key and file.
//!
//! Real: Mosquitto (OpenSSL), the openssl CLI, the gateway in process and as its binary, the
//! SQLite file, a rumqttc TLS client standing in for devices. Faked: nothing.

mod support;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use nn_gateway::health::LinkState;
use nn_gateway::store::Db;
use rumqttc::{MqttOptions, TlsConfiguration, Transport};
use serde_json::{Value, json};
use support::{Device, Gateway, Mosquitto, config_with_env, reported, skip, wait_for};

const WAIT: Duration = Duration::from_secs(10);

/// Makes, in the current directory: CA `ca` and an unrelated `other-ca`; server certificates
/// `server` (localhost, 127.0.0.1), `elsewhere` (broker.example) and `expired` (localhost, in
/// 2020), signed by `ca`; client certificates `client` (by `ca`) and `stranger` (by
/// `other-ca`). P-256 keys, PKCS#8 PEM. `openssl x509 -req` cannot date a certificate in the
/// past before OpenSSL 3.4, so the expired one goes through `openssl ca -startdate -enddate`.
const MAKE_PKI: &str = r#"
ca() {
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
    -keyout "$1.key" -out "$1.pem" -days 3 -subj "/CN=$1" \
    -addext basicConstraints=critical,CA:TRUE -addext keyUsage=critical,keyCertSign,cRLSign
}
csr() {
  openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
    -keyout "$1.key" -out "$1.csr" -subj "/CN=$1"
}
leaf() { # name, issuer, subjectAltName, extendedKeyUsage
  csr "$1"
  printf 'subjectAltName=%s\nbasicConstraints=CA:FALSE\nextendedKeyUsage=%s\n' "$3" "$4" > "$1.ext"
  openssl x509 -req -in "$1.csr" -CA "$2.pem" -CAkey "$2.key" -CAcreateserial -days 3 \
    -out "$1.pem" -extfile "$1.ext"
}
ca ca
ca other-ca
leaf server ca "DNS:localhost,IP:127.0.0.1" serverAuth
leaf elsewhere ca "DNS:broker.example" serverAuth
leaf client ca "DNS:gateway" clientAuth
leaf stranger other-ca "DNS:gateway" clientAuth
mkdir ca-db && touch ca-db/index.txt && echo 01 > ca-db/serial
cat > ca.cnf <<EOF
[ca]
default_ca = test
[test]
database = ca-db/index.txt
new_certs_dir = ca-db
serial = ca-db/serial
default_md = sha256
policy = any
x509_extensions = ext
[any]
commonName = supplied
[ext]
subjectAltName = DNS:localhost,IP:127.0.0.1
basicConstraints = CA:FALSE
extendedKeyUsage = serverAuth
EOF
csr expired
openssl ca -batch -config ca.cnf -cert ca.pem -keyfile ca.key -in expired.csr -out expired.pem \
  -startdate 20200101000000Z -enddate 20200102000000Z -notext
"#;

/// The certificates of one test, in a directory Mosquitto's own user can read.
struct Pki {
    dir: tempfile::TempDir,
}

impl Pki {
    /// `None` (the test skipped, or failed under CI) when openssl or mosquitto is missing.
    fn make(test: &str) -> Option<Pki> {
        for tool in ["openssl", "mosquitto"] {
            let found = Command::new("sh")
                .args(["-c", &format!("command -v {tool}")])
                .output()
                .is_ok_and(|o| o.status.success());
            if !found {
                skip(test, &format!("`{tool}` is not installed"));
                return None;
            }
        }
        let dir = tempfile::tempdir().unwrap();
        let out = Command::new("sh")
            .args(["-ec", MAKE_PKI])
            .current_dir(dir.path())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "openssl failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        // Mosquitto started as root reads its files after dropping to its own user.
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        for entry in std::fs::read_dir(dir.path()).unwrap() {
            let path = entry.unwrap().path();
            if path.is_file() {
                std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
            }
        }
        Some(Pki { dir })
    }

    fn path(&self, file: &str) -> PathBuf {
        self.dir.path().join(file)
    }

    /// A TLS broker presenting certificate `server` (signed by `ca`).
    fn broker(&self, server: &str, require_client_cert: bool) -> Mosquitto {
        Mosquitto::start_tls(&format!(
            "cafile {}\ncertfile {}\nkeyfile {}\nrequire_certificate {require_client_cert}",
            self.path("ca.pem").display(),
            self.path(&format!("{server}.pem")).display(),
            self.path(&format!("{server}.key")).display(),
        ))
    }

    /// A device client over TLS trusting `ca`, with client certificate `cert` if given.
    async fn device(&self, port: u16, id: &str, cert: Option<&str>) -> Device {
        nn_gateway::cloud::install_crypto_provider();
        let read = |f: String| std::fs::read(self.path(&f)).unwrap();
        let mut opts = MqttOptions::new(id, "localhost", port);
        opts.set_transport(Transport::tls_with_config(TlsConfiguration::Simple {
            ca: read("ca.pem".into()),
            alpn: None,
            client_auth: cert.map(|c| (read(format!("{c}.pem")), read(format!("{c}.key")))),
        }));
        Device::connect_with(opts).await
    }
}

/// The `NNGW_` settings for `[mqtt.tls]`: `(key, file)` pairs and a server name.
fn tls_env(pki: &Pki, files: &[(&str, &str)], server_name: Option<&str>) -> Vec<(String, String)> {
    let mut env = vec![("NNGW_MQTT__TLS__ENABLED".to_owned(), "true".to_owned())];
    for (key, file) in files {
        env.push((
            format!("NNGW_MQTT__TLS__{}", key.to_uppercase()),
            pki.path(file).display().to_string(),
        ));
    }
    if let Some(name) = server_name {
        env.push(("NNGW_MQTT__TLS__SERVER_NAME".to_owned(), name.to_owned()));
    }
    env
}

async fn gateway(dir: &Path, port: u16, id: &str, env: &[(String, String)]) -> Gateway {
    Gateway::start(config_with_env(dir, port, id, env).unwrap()).await
}

/// The link state and last MQTT error of the daemon's latest heartbeat.
fn link(db: &Db) -> Option<(LinkState, Option<String>)> {
    let beat = db.status().ok()?.daemon?;
    Some((beat.mqtt, beat.mqtt_error))
}

/// Waits for the heartbeat to show the link refused with an error containing `words`.
async fn refused_with(db: &Path, words: &str) -> String {
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let seen = Db::open_readonly(db).ok().and_then(|db| link(&db));
        if let Some((LinkState::Refused, Some(e))) = &seen
            && e.contains(words)
        {
            return e.clone();
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no refusal saying {words:?} within {WAIT:?}; last seen: {seen:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn connected(db: &Path) {
    wait_for(db, WAIT, |db| {
        link(db).filter(|(state, error)| *state == LinkState::Connected && error.is_none())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_tls_the_gateway_stores_what_devices_publish_and_publishes_desired_to_them() {
    let Some(pki) = Pki::make("over_tls_the_gateway_stores_what_devices_publish") else {
        return;
    };
    let broker = pki.broker("server", false);
    let dir = tempfile::tempdir().unwrap();
    let env = tls_env(&pki, &[("ca_file", "ca.pem")], None);
    let gw = gateway(dir.path(), broker.port, "gw-tls", &env).await;
    connected(&gw.db).await;

    let mut dev = pki.device(broker.port, "dev-tls", None).await;
    support::wait_subscribed(&dev, &gw.db).await;
    dev.publish("devices/tls-1/state", br#"{"fw":"1.2"}"#.to_vec())
        .await;
    dev.publish("devices/tls-1/telemetry", br#"{"t":21.5}"#.to_vec())
        .await;
    let state = wait_for(&gw.db, WAIT, |db| reported(db, "tls-1")).await;
    assert_eq!(state, json!({"fw":"1.2"}));
    let key = nn_gateway::model::DeviceKey::parse("tls-1").unwrap();
    let points = wait_for(&gw.db, WAIT, |db| {
        db.telemetry_payloads(&key).ok().filter(|p| !p.is_empty())
    })
    .await;
    assert_eq!(points, [json!({"t":21.5})]);

    dev.client
        .subscribe("devices/tls-1/desired", rumqttc::QoS::AtLeastOnce)
        .await
        .unwrap();
    nn_gateway::cli::set_desired(&gw.db, "tls-1", r#"{"rate":"5s"}"#, false).unwrap();
    let msg = tokio::time::timeout(WAIT, dev.events.recv())
        .await
        .expect("desired publish over TLS")
        .unwrap();
    assert_eq!(msg.topic, "devices/tls-1/desired");
    assert_eq!(
        serde_json::from_slice::<Value>(&msg.payload).unwrap(),
        json!({"rate":"5s"})
    );
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_requiring_a_client_certificate_refuses_none_and_a_strangers_and_takes_ours() {
    let Some(pki) = Pki::make("a_broker_requiring_a_client_certificate") else {
        return;
    };
    let broker = pki.broker("server", true);

    let dir = tempfile::tempdir().unwrap();
    let env = tls_env(&pki, &[("ca_file", "ca.pem")], None);
    let gw = gateway(dir.path(), broker.port, "gw-nocert", &env).await;
    let e = refused_with(&gw.db, "client certificate").await;
    assert!(
        e.contains("requires a client certificate (mqtt.tls.cert_file)"),
        "{e}"
    );
    gw.stop().await;

    let dir = tempfile::tempdir().unwrap();
    let files = [
        ("ca_file", "ca.pem"),
        ("cert_file", "stranger.pem"),
        ("key_file", "stranger.key"),
    ];
    let gw = gateway(
        dir.path(),
        broker.port,
        "gw-stranger",
        &tls_env(&pki, &files, None),
    )
    .await;
    let e = refused_with(&gw.db, "mqtt.tls.cert_file").await;
    assert!(
        e.contains("does not trust the CA that signed our client certificate")
            || e.contains("refused our client certificate"),
        "{e}"
    );
    gw.stop().await;

    let dir = tempfile::tempdir().unwrap();
    let files = [
        ("ca_file", "ca.pem"),
        ("cert_file", "client.pem"),
        ("key_file", "client.key"),
    ];
    let gw = gateway(
        dir.path(),
        broker.port,
        "gw-cert",
        &tls_env(&pki, &files, None),
    )
    .await;
    connected(&gw.db).await;
    // Connected means subscribed too: a device with its own certificate gets through.
    let dev = pki.device(broker.port, "dev-cert", Some("client")).await;
    support::wait_subscribed(&dev, &gw.db).await;
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_for_another_name_is_refused_naming_both_names_unless_server_name_says_so() {
    let Some(pki) = Pki::make("a_certificate_for_another_name_is_refused") else {
        return;
    };
    let broker = pki.broker("elsewhere", false);
    let dir = tempfile::tempdir().unwrap();
    let env = tls_env(&pki, &[("ca_file", "ca.pem")], None);
    let gw = gateway(dir.path(), broker.port, "gw-name", &env).await;
    let e = refused_with(&gw.db, "not valid for name").await;
    assert!(
        e.starts_with("TLS: the broker's certificate is not valid for name \"127.0.0.1\"")
            && e.contains("(it names broker.example)"),
        "{e}"
    );
    gw.stop().await;

    // Reached by address, verified by the name its certificate carries.
    let dir = tempfile::tempdir().unwrap();
    let env = tls_env(&pki, &[("ca_file", "ca.pem")], Some("broker.example"));
    let gw = gateway(dir.path(), broker.port, "gw-named", &env).await;
    connected(&gw.db).await;
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_certificate_from_another_ca_is_refused_naming_the_ca_file() {
    let Some(pki) = Pki::make("a_broker_certificate_from_another_ca_is_refused") else {
        return;
    };
    let broker = pki.broker("server", false);
    let dir = tempfile::tempdir().unwrap();
    let env = tls_env(&pki, &[("ca_file", "other-ca.pem")], None);
    let gw = gateway(dir.path(), broker.port, "gw-ca", &env).await;
    let e = refused_with(&gw.db, "not signed by the CA").await;
    assert_eq!(
        e,
        format!(
            "TLS: the broker's certificate is not signed by the CA in {} (mqtt.tls.ca_file)",
            pki.path("other-ca.pem").display()
        )
    );
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_broker_certificate_is_refused_as_expired() {
    let Some(pki) = Pki::make("an_expired_broker_certificate_is_refused") else {
        return;
    };
    let broker = pki.broker("expired", false);
    let dir = tempfile::tempdir().unwrap();
    let env = tls_env(&pki, &[("ca_file", "ca.pem")], None);
    let gw = gateway(dir.path(), broker.port, "gw-expired", &env).await;
    let e = refused_with(&gw.db, "expired").await;
    assert!(
        e.starts_with("TLS: the broker's certificate expired (valid until 2020-01-02T00:00:00Z)"),
        "{e}"
    );
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_to_a_plain_listener_is_down_and_the_error_suspects_the_port() {
    let Some(pki) = Pki::make("tls_to_a_plain_listener_is_down") else {
        return;
    };
    let broker = Mosquitto::start();
    let dir = tempfile::tempdir().unwrap();
    let env = tls_env(&pki, &[("ca_file", "ca.pem")], None);
    let gw = gateway(dir.path(), broker.port, "gw-plain", &env).await;
    let e = wait_for(&gw.db, WAIT, |db| match link(db)? {
        (LinkState::Down, Some(e)) if e.starts_with("TLS:") => Some(e),
        _ => None,
    })
    .await;
    assert!(
        e.contains("closed the connection during the handshake") && e.contains("8883"),
        "{e}"
    );
    gw.stop().await;
}

fn nngw(args: &[&str], env: &[(String, String)]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_nn-gateway"))
        .args(args)
        .envs(env.iter().map(|(k, v)| (k, v)))
        .output()
        .unwrap()
}

fn text(out: &Output) -> String {
    support::output_text(out)
}

#[test]
fn the_daemon_logs_the_certificate_problem_when_it_cannot_connect() {
    let Some(pki) = Pki::make("the_daemon_logs_the_certificate_problem") else {
        return;
    };
    let broker = pki.broker("server", false);
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("gateway.db").display().to_string();
    let port = broker.port.to_string();
    let ca = pki.path("other-ca.pem").display().to_string();
    let (clean, log) = support::run_daemon_binary_for(
        &[
            ("NNGW_STORAGE__PATH", db.as_str()),
            ("NNGW_MQTT__PORT", port.as_str()),
            ("NNGW_COAP__BIND", "127.0.0.1:0"),
            ("NNGW_API__ENABLED", "false"),
            ("NNGW_MQTT__TLS__ENABLED", "true"),
            ("NNGW_MQTT__TLS__CA_FILE", ca.as_str()),
        ],
        Duration::from_secs(3),
    );
    assert!(clean, "{log}");
    assert!(
        log.contains(&format!(
            "cannot reach broker: TLS: the broker's certificate is not signed by the CA in {ca} (mqtt.tls.ca_file); retrying with backoff"
        )),
        "{log}"
    );
    assert!(log.contains("mqtts://127.0.0.1:"), "{log}");
}

#[test]
fn check_config_refuses_tls_files_it_cannot_use_naming_the_key_and_the_file() {
    let Some(pki) = Pki::make("check_config_refuses_tls_files") else {
        return;
    };
    std::fs::write(pki.path("notes.txt"), "not a certificate\n").unwrap();
    std::fs::write(pki.path("empty.pem"), "\n").unwrap();
    // (the `[mqtt.tls]` keys set to files, the key blamed, the file named, the problem)
    type Case<'a> = (&'a [(&'a str, &'a str)], &'a str, &'a str, &'a str);
    let cases: [Case; 7] = [
        (&[], "mqtt.tls.ca_file", "", "is required"),
        (
            &[("ca_file", "missing.pem")],
            "mqtt.tls.ca_file",
            "missing.pem",
            "cannot read",
        ),
        (
            &[("ca_file", "notes.txt")],
            "mqtt.tls.ca_file",
            "notes.txt",
            "no certificate in it",
        ),
        (
            &[("ca_file", "empty.pem")],
            "mqtt.tls.ca_file",
            "empty.pem",
            "empty",
        ),
        (
            &[("ca_file", "ca.pem"), ("cert_file", "client.pem")],
            "mqtt.tls.key_file",
            "client.pem",
            "set both or neither",
        ),
        (
            &[
                ("ca_file", "ca.pem"),
                ("cert_file", "client.pem"),
                ("key_file", "client.pem"),
            ],
            "mqtt.tls.key_file",
            "client.pem",
            "no private key in it",
        ),
        (
            &[
                ("ca_file", "ca.pem"),
                ("cert_file", "client.pem"),
                ("key_file", "stranger.key"),
            ],
            "mqtt.tls.key_file",
            "stranger.key",
            "does not belong to the certificate",
        ),
    ];
    for (files, key, file, problem) in cases {
        let out = nngw(&["check-config"], &tls_env(&pki, files, None));
        let msg = text(&out);
        assert_eq!(out.status.code(), Some(78), "{files:?}: {msg}");
        assert!(
            msg.contains(key) && msg.contains(file) && msg.contains(problem),
            "{files:?}: wanted {key}, {file}, {problem:?} in: {msg}"
        );
    }

    // A good set is accepted and shown by path; the key's content never.
    let files = [
        ("ca_file", "ca.pem"),
        ("cert_file", "client.pem"),
        ("key_file", "client.key"),
    ];
    let out = nngw(&["check-config"], &tls_env(&pki, &files, None));
    let shown = text(&out);
    assert!(out.status.success(), "{shown}");
    assert!(
        shown.contains("[mqtt.tls]") && shown.contains("client.key"),
        "{shown}"
    );
    let key = std::fs::read_to_string(pki.path("client.key")).unwrap();
    let secret_line = key.lines().nth(1).unwrap();
    assert!(!shown.contains(secret_line), "the key leaked: {shown}");
}
