//! A client of a gateway's HTTP API, as a script or the console would call it.

use reqwest::Method;
use serde_json::Value;

/// A client of one gateway's API.
pub struct Http {
    pub base: String,
    pub token: String,
    pub client: reqwest::Client,
}

impl Http {
    /// The gateway's API with the token it made beside its database.
    pub fn of(gw: &crate::support::Gateway) -> Http {
        nn_gateway::cloud::install_crypto_provider();
        let token_file = gw
            .db
            .parent()
            .unwrap()
            .join(nn_gateway::api::TOKEN_FILE_NAME);
        Http {
            base: format!("http://127.0.0.1:{}", gw.api_port),
            token: std::fs::read_to_string(token_file)
                .unwrap()
                .trim()
                .to_owned(),
            client: reqwest::Client::new(),
        }
    }

    pub async fn call(
        &self,
        method: Method,
        path: &str,
        token: Option<&str>,
        body: Option<reqwest::Body>,
        headers: &[(&str, &str)],
    ) -> (u16, Value) {
        let mut rb = self.client.request(method, format!("{}{path}", self.base));
        if let Some(t) = token {
            rb = rb.bearer_auth(t);
        }
        if let Some(b) = body {
            rb = rb.header("content-type", "application/json").body(b);
        }
        for (k, v) in headers {
            rb = rb.header(*k, *v);
        }
        let resp = rb.send().await.expect("the API answers");
        let status = resp.status().as_u16();
        let text = resp.text().await.unwrap();
        let value = serde_json::from_str(&text).unwrap_or(Value::String(text));
        (status, value)
    }

    pub async fn get(&self, path: &str) -> (u16, Value) {
        self.call(Method::GET, path, Some(&self.token), None, &[])
            .await
    }

    pub async fn send(&self, method: Method, path: &str, body: Value) -> (u16, Value) {
        let body = reqwest::Body::from(body.to_string());
        self.call(method, path, Some(&self.token), Some(body), &[])
            .await
    }

    pub async fn post(&self, path: &str) -> (u16, Value) {
        self.call(Method::POST, path, Some(&self.token), None, &[])
            .await
    }
}
