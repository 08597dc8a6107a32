//! Self-tests of the fake clouds: real HTTP (reqwest) against the fakes in `tests/fakes/`,
//! pinning down what the fakes promise the gateway's tests. Of the gateway only its cloud
//! clients run here (`selftest_clients`), to show the fakes take what they send.

#[path = "mod.rs"]
mod fakes;

mod selftest_clients;
mod selftest_faults;
mod selftest_golioth;
mod selftest_netneural;
mod selftest_netneural_sync;

use std::time::Duration;

/// A plain-HTTP client (reqwest is built without a TLS provider of its own).
fn client() -> reqwest::Client {
    client_with_timeout(Duration::from_secs(10))
}

fn client_with_timeout(timeout: Duration) -> reqwest::Client {
    nn_gateway::cloud::install_crypto_provider();
    reqwest::Client::builder()
        .timeout(timeout)
        .build()
        .expect("a client")
}
