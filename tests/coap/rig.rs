//! The rig of the CoAP tests: a server on a temporary store, the real `coap-client-notls`,
//! and hand-made datagrams.
#![allow(dead_code)] // Not every item is used by every test.

use std::net::SocketAddr;
use std::process::Output;
use std::time::Duration;

use coap_lite::option_value::OptionValueU32;
use coap_lite::{CoapOption, MessageClass, MessageType, Packet, RequestType, ResponseType};
use nn_gateway::coap::{self, CoapHandle};
use nn_gateway::config::{CoapConfig, Synchronous};
use nn_gateway::model::{DesiredDoc, DeviceKey, Origin, Target};
use nn_gateway::store::{OpenOptions, Store};
use serde_json::Value;
use tokio::net::UdpSocket;
use tokio::time::timeout;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Longest wait for an expected datagram or condition.
pub const PATIENCE: Duration = Duration::from_secs(3);

pub struct Gateway {
    pub store: Store,
    pub handle: CoapHandle,
    pub addr: SocketAddr,
    pub shutdown: CancellationToken,
    pub tracker: TaskTracker,
    pub dir: tempfile::TempDir,
}

impl Gateway {
    pub async fn start(cfg: CoapConfig) -> Gateway {
        let dir = tempfile::tempdir().unwrap();
        let opts = OpenOptions {
            synchronous: Synchronous::Normal,
            targets: vec![Target::NetNeural],
            rejected_keep: 100,
        };
        let store = Store::open(&dir.path().join("gateway.db"), &opts).unwrap();
        let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let addr = socket.local_addr().unwrap();
        let shutdown = CancellationToken::new();
        let tracker = TaskTracker::new();
        let links = coap::Links {
            socket,
            store: store.clone(),
            shutdown: shutdown.clone(),
        };
        let handle = coap::spawn(&cfg, links, &tracker);
        Gateway {
            store,
            handle,
            addr,
            shutdown,
            tracker,
            dir,
        }
    }

    pub async fn default() -> Gateway {
        Gateway::start(CoapConfig::default()).await
    }

    pub fn uri(&self, path: &str) -> String {
        format!("coap://{}{path}", self.addr)
    }

    /// Runs `coap-client-notls` with `-v 6` (which prints each PDU on stdout) and a 2 s
    /// timeout.
    pub async fn client(&self, args: &[&str], path: &str) -> Output {
        let mut all: Vec<String> = ["-v", "6", "-B", "2"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        all.extend(args.iter().map(|s| s.to_string()));
        all.push(self.uri(path));
        run_client(all).await
    }

    pub async fn devices(&self) -> Vec<nn_gateway::store::DeviceView> {
        self.store.call(|db| db.devices()).await.unwrap()
    }

    pub async fn telemetry(&self, key: &str) -> Vec<Value> {
        let key = DeviceKey::parse(key).unwrap();
        self.store
            .call(move |db| db.telemetry_payloads(&key))
            .await
            .unwrap()
    }

    pub async fn rejected(&self) -> Vec<nn_gateway::store::RejectedView> {
        self.store.call(|db| db.rejected(10)).await.unwrap()
    }

    pub async fn set_desired(&self, key: &str, doc: Value) -> DesiredDoc {
        let key = DeviceKey::parse(key).unwrap();
        self.store
            .call(move |db| db.set_desired(&key, &doc, Origin::Local))
            .await
            .unwrap()
    }

    /// Parks the store thread until the returned sender is used or dropped.
    pub async fn block_store(&self) -> std::sync::mpsc::Sender<()> {
        let (entered_tx, entered_rx) = tokio::sync::oneshot::channel();
        let (release_tx, release_rx) = std::sync::mpsc::channel::<()>();
        let store = self.store.clone();
        tokio::spawn(async move {
            store
                .call(move |_db| {
                    let _ = entered_tx.send(());
                    let _ = release_rx.recv();
                    Ok(())
                })
                .await
        });
        entered_rx.await.unwrap();
        release_tx
    }

    pub async fn stop(self) {
        self.shutdown.cancel();
        self.tracker.close();
        timeout(PATIENCE, self.tracker.wait())
            .await
            .expect("server tasks stop");
        self.store.close().await;
    }
}

pub async fn run_client(args: Vec<String>) -> Output {
    tokio::task::spawn_blocking(move || {
        std::process::Command::new("coap-client-notls")
            .args(&args)
            .output()
            .expect("coap-client-notls is installed (Debian package libcoap3-bin)")
    })
    .await
    .unwrap()
}

pub fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

pub fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// The response code libcoap printed for the response (`t:ACK c:2.01 …`).
pub fn code(out: &Output) -> String {
    let text = stdout(out);
    let line = text
        .lines()
        .find(|l| l.contains("t:ACK") || (l.contains("t:NON c:") && !l.contains("c:POST")))
        .unwrap_or_else(|| panic!("no response in {text:?} / {:?}", stderr(out)));
    line.split_whitespace()
        .find_map(|w| w.strip_prefix("c:"))
        .unwrap()
        .to_owned()
}

/// A UDP peer speaking raw CoAP.
pub struct Raw {
    pub socket: UdpSocket,
    pub server: SocketAddr,
}

impl Raw {
    pub async fn new(server: SocketAddr) -> Raw {
        Raw {
            socket: UdpSocket::bind("127.0.0.1:0").await.unwrap(),
            server,
        }
    }

    pub async fn send(&self, p: &Packet) {
        self.send_bytes(&p.to_bytes().unwrap()).await;
    }

    pub async fn send_bytes(&self, bytes: &[u8]) {
        self.socket.send_to(bytes, self.server).await.unwrap();
    }

    pub async fn recv_bytes(&self) -> Vec<u8> {
        let mut buf = vec![0; 2048];
        let (n, _) = timeout(PATIENCE, self.socket.recv_from(&mut buf))
            .await
            .expect("a datagram from the server")
            .unwrap();
        buf.truncate(n);
        buf
    }

    pub async fn recv(&self) -> Packet {
        Packet::from_bytes(&self.recv_bytes().await).unwrap()
    }

    /// Sends a CoAP ping and expects its RST as the very next datagram.
    pub async fn barrier(&self, mid: u16) {
        self.send_bytes(&[0x40, 0, (mid >> 8) as u8, mid as u8])
            .await;
        let p = self.recv().await;
        assert_eq!(
            (p.header.get_type(), p.header.message_id),
            (MessageType::Reset, mid),
            "expected only the RST to the ping, got {p:?}"
        );
    }
}

pub fn request(
    kind: MessageType,
    method: RequestType,
    mid: u16,
    path: &str,
    payload: &[u8],
) -> Packet {
    let mut p = Packet::new();
    p.header.set_version(1);
    p.header.set_type(kind);
    p.header.code = MessageClass::Request(method);
    p.header.message_id = mid;
    p.set_token(vec![0xbe, 0xef, mid as u8]);
    for segment in path.split('/').skip(1) {
        p.add_option(CoapOption::UriPath, segment.as_bytes().to_vec());
    }
    p.payload = payload.to_vec();
    p
}

pub fn con_post(mid: u16, path: &str, payload: &[u8]) -> Packet {
    request(
        MessageType::Confirmable,
        RequestType::Post,
        mid,
        path,
        payload,
    )
}

pub fn response_code(p: &Packet) -> ResponseType {
    match p.header.code {
        MessageClass::Response(r) => r,
        other => panic!("not a response: {other:?}"),
    }
}

pub fn uint_option(p: &Packet, option: CoapOption) -> Option<u32> {
    p.get_first_option_as::<OptionValueU32>(option)
        .map(|v| v.unwrap().0)
}

pub async fn eventually(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while !check() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}
