//! CoAP server (placeholder signature; being written).

use tokio::net::UdpSocket;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::CoapConfig;
use crate::store::{DesiredDoc, Store};

#[derive(Clone)]
pub struct CoapHandle {}

impl CoapHandle {
    pub fn desired_changed(&self, _doc: DesiredDoc) {}
}

pub fn spawn(
    _socket: UdpSocket,
    _cfg: &CoapConfig,
    _store: Store,
    _tracker: &TaskTracker,
    _shutdown: CancellationToken,
) -> CoapHandle {
    CoapHandle {}
}
