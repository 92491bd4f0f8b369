//! Uploading output.json as an artifact: a ConfigMap `<release>-output` written by server-side
//! apply, so a re-run of the replay Job replaces it (and `kubectl get configmap` fetches it).
//!
//! Size handling: Kubernetes limits a ConfigMap's data to 1 MiB. Outputs up to
//! [`PLAIN_LIMIT`] go into `data["output.json"]` as they are (readable with `kubectl`); larger
//! ones are gzip-compressed into `binaryData["output.json.gz"]`; a compressed output that still
//! does not fit is refused with a clear error rather than half-written.

use std::collections::BTreeMap;
use std::io::{Read as _, Write as _};

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::ConfigMap;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{Api, Patch, PatchParams};

/// Key of the plain output in `data`.
pub const PLAIN_KEY: &str = "output.json";
/// Key of the gzip-compressed output in `binaryData`.
pub const GZIP_KEY: &str = "output.json.gz";
/// Largest output stored uncompressed (leaves room under the 1 MiB limit for metadata).
pub const PLAIN_LIMIT: usize = 900 * 1024;
/// Kubernetes' limit on a ConfigMap's data.
pub const CONFIGMAP_LIMIT: usize = 1024 * 1024;
/// The field manager our server-side applies use.
pub const FIELD_MANAGER: &str = "distbank-replay";

#[derive(Debug, thiserror::Error)]
pub enum ArtifactError {
    #[error(
        "output.json is {bytes} bytes ({compressed} gzip-compressed), more than a ConfigMap can hold ({CONFIGMAP_LIMIT} bytes); keep the output file from the Job's volume instead"
    )]
    TooLarge { bytes: usize, compressed: usize },
    #[error("cannot compress output.json: {0}")]
    Compress(#[source] std::io::Error),
    #[error(
        "forbidden to write ConfigMap {namespace}/{name}: {message}. The replay Job's ServiceAccount needs get/create/patch on configmaps (see the chart's Role)"
    )]
    Forbidden {
        namespace: String,
        name: String,
        message: String,
    },
    #[error(
        "conflict writing ConfigMap {namespace}/{name}: {message}. Another field manager owns it; delete it or rename the release"
    )]
    Conflict {
        namespace: String,
        name: String,
        message: String,
    },
    #[error("the Kubernetes API rejected ConfigMap {namespace}/{name}: {code} {reason}: {message}")]
    Rejected {
        namespace: String,
        name: String,
        code: u16,
        reason: String,
        message: String,
    },
    #[error("cannot reach the Kubernetes API to write ConfigMap {namespace}/{name}: {message}")]
    Unreachable {
        namespace: String,
        name: String,
        message: String,
    },
    #[error("no Kubernetes configuration (in-cluster service account or kubeconfig): {0}")]
    Config(String),
}

/// The output as it will be stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Payload {
    Plain(String),
    Gzip(Vec<u8>),
}

/// Chooses plain or gzip storage for `output`, or refuses it when even compressed it is too big.
pub fn prepare(output: &str) -> Result<Payload, ArtifactError> {
    if output.len() <= PLAIN_LIMIT {
        return Ok(Payload::Plain(output.to_string()));
    }
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
    encoder.write_all(output.as_bytes()).map_err(ArtifactError::Compress)?;
    let compressed = encoder.finish().map_err(ArtifactError::Compress)?;
    if compressed.len() > PLAIN_LIMIT {
        return Err(ArtifactError::TooLarge {
            bytes: output.len(),
            compressed: compressed.len(),
        });
    }
    Ok(Payload::Gzip(compressed))
}

/// The ConfigMap holding `payload`.
pub fn config_map(name: &str, namespace: &str, payload: Payload, labels: BTreeMap<String, String>) -> ConfigMap {
    let (data, binary_data) = match payload {
        Payload::Plain(text) => (Some(BTreeMap::from([(PLAIN_KEY.to_string(), text)])), None),
        Payload::Gzip(bytes) => (None, Some(BTreeMap::from([(GZIP_KEY.to_string(), ByteString(bytes))]))),
    };
    ConfigMap {
        metadata: ObjectMeta {
            name: Some(name.to_string()),
            namespace: Some(namespace.to_string()),
            labels: Some(labels),
            ..ObjectMeta::default()
        },
        data,
        binary_data,
        ..ConfigMap::default()
    }
}

/// Writes `output` to ConfigMap `name` by server-side apply (create or replace).
pub async fn upload(
    client: kube::Client,
    namespace: &str,
    name: &str,
    output: &str,
    labels: BTreeMap<String, String>,
) -> Result<Payload, ArtifactError> {
    let payload = prepare(output)?;
    let config_map = config_map(name, namespace, payload.clone(), labels);
    let api: Api<ConfigMap> = Api::namespaced(client, namespace);
    // force: the replay is this object's only writer; a re-run takes over fields it set before.
    let params = PatchParams::apply(FIELD_MANAGER).force();
    match api.patch(name, &params, &Patch::Apply(&config_map)).await {
        Ok(_) => Ok(payload),
        Err(error) => Err(classify(error, namespace, name)),
    }
}

/// Turns a kube error into one that says what to do about it.
pub fn classify(error: kube::Error, namespace: &str, name: &str) -> ArtifactError {
    let (namespace, name) = (namespace.to_string(), name.to_string());
    match error {
        kube::Error::Api(status) if status.is_forbidden() || status.code == 403 => ArtifactError::Forbidden {
            namespace,
            name,
            message: status.message,
        },
        kube::Error::Api(status) if status.is_conflict() || status.code == 409 => ArtifactError::Conflict {
            namespace,
            name,
            message: status.message,
        },
        kube::Error::Api(status) => ArtifactError::Rejected {
            namespace,
            name,
            code: status.code,
            reason: status.reason,
            message: status.message,
        },
        other => ArtifactError::Unreachable {
            namespace,
            name,
            message: crate::error_chain(&other),
        },
    }
}

/// The output stored in `config_map` (plain or gzip), as written by [`upload`].
pub fn output_from(config_map: &ConfigMap) -> Result<String, FetchError> {
    if let Some(text) = config_map.data.as_ref().and_then(|data| data.get(PLAIN_KEY)) {
        return Ok(text.clone());
    }
    if let Some(bytes) = config_map.binary_data.as_ref().and_then(|data| data.get(GZIP_KEY)) {
        let mut text = String::new();
        flate2::read::GzDecoder::new(&bytes.0[..])
            .read_to_string(&mut text)
            .map_err(|e| FetchError::Corrupt(e.to_string()))?;
        return Ok(text);
    }
    Err(FetchError::Missing)
}

/// Reads the output back from ConfigMap `name` (what `distbank fetch-output` does).
pub async fn fetch(client: kube::Client, namespace: &str, name: &str) -> Result<String, FetchError> {
    let api: Api<ConfigMap> = Api::namespaced(client, namespace);
    let config_map = match api.get_opt(name).await {
        Ok(Some(config_map)) => config_map,
        Ok(None) => return Err(FetchError::NotFound(format!("{namespace}/{name}"))),
        Err(error) => return Err(FetchError::Api(crate::error_chain(&error))),
    };
    output_from(&config_map)
}

#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("ConfigMap {0} does not exist (yet): the replay Job has not finished, or ran in another namespace")]
    NotFound(String),
    #[error("the ConfigMap has neither data[\"{PLAIN_KEY}\"] nor binaryData[\"{GZIP_KEY}\"]")]
    Missing,
    #[error("binaryData[\"{GZIP_KEY}\"] is not valid gzip text: {0}")]
    Corrupt(String),
    #[error("reading the ConfigMap: {0}")]
    Api(String),
}

/// A client from the environment (in-cluster service account, else kubeconfig) and the
/// namespace to write to (`POD_NAMESPACE`, else the client's default namespace).
pub async fn client_from_env() -> Result<(kube::Client, String), ArtifactError> {
    let client = kube::Client::try_default()
        .await
        .map_err(|e| ArtifactError::Config(crate::error_chain(&e)))?;
    let namespace = std::env::var("POD_NAMESPACE")
        .ok()
        .filter(|ns| !ns.is_empty())
        .unwrap_or_else(|| client.default_namespace().to_string());
    Ok((client, namespace))
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    use super::*;

    #[test]
    fn small_outputs_are_stored_plain() {
        let payload = prepare("[]").expect("fits");
        assert_eq!(payload, Payload::Plain("[]".into()));
        let cm = config_map("rel-output", "ns", payload, BTreeMap::new());
        assert_eq!(cm.data.expect("data")[PLAIN_KEY], "[]");
        assert!(cm.binary_data.is_none());
    }

    #[test]
    fn large_outputs_are_gzipped_and_round_trip() {
        // ~2 MiB of course-style output compresses far below the limit.
        let big = format!(
            "[{}]",
            vec![r#"{"id": 1, "recv": [{"interface": "query", "balance": 400}]}"#; 35_000].join(", ")
        );
        assert!(big.len() > CONFIGMAP_LIMIT);
        let Payload::Gzip(bytes) = prepare(&big).expect("fits compressed") else {
            panic!("expected gzip")
        };
        assert!(bytes.len() <= PLAIN_LIMIT);
        let mut text = String::new();
        flate2::read::GzDecoder::new(&bytes[..])
            .read_to_string(&mut text)
            .expect("gunzip");
        assert_eq!(text, big);
        let cm = config_map("rel-output", "ns", Payload::Gzip(bytes), BTreeMap::new());
        assert!(cm.data.is_none());
        assert!(cm.binary_data.expect("binaryData").contains_key(GZIP_KEY));
    }

    #[test]
    fn stored_outputs_read_back() {
        let plain = config_map("o", "ns", prepare("[1]").expect("fits"), BTreeMap::new());
        assert_eq!(output_from(&plain).expect("plain"), "[1]");
        let big = "[".to_string() + &"0, ".repeat(400_000) + "0]";
        let gzipped = config_map("o", "ns", prepare(&big).expect("fits"), BTreeMap::new());
        assert!(gzipped.data.is_none());
        assert_eq!(output_from(&gzipped).expect("gzip"), big);
        assert!(matches!(output_from(&ConfigMap::default()), Err(FetchError::Missing)));
        let corrupt = config_map("o", "ns", Payload::Gzip(b"not gzip".to_vec()), BTreeMap::new());
        assert!(matches!(output_from(&corrupt), Err(FetchError::Corrupt(_))));
    }

    #[test]
    fn incompressible_outputs_beyond_the_limit_are_refused() {
        // Pseudo-random digits barely compress.
        let mut state = 0x2545_f491_4f6c_dd1d_u64;
        let noise: String = (0..3_000_000)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                char::from(b'0' + (state % 10) as u8)
            })
            .collect();
        let error = prepare(&noise).expect_err("too large");
        assert!(
            matches!(error, ArtifactError::TooLarge { bytes: 3_000_000, .. }),
            "{error}"
        );
        assert!(error.to_string().contains("more than a ConfigMap can hold"), "{error}");
    }

    /// A one-shot HTTP server answering every request with `status` and a Kubernetes Status body.
    async fn fake_api(code: u16, reason: &str, message: &str) -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let body = serde_json::json!({
            "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": message, "reason": reason, "code": code
        })
        .to_string();
        let phrase = if code == 403 { "Forbidden" } else { "Conflict" };
        tokio::spawn(async move {
            while let Ok((mut socket, _)) = listener.accept().await {
                let mut buffer = vec![0u8; 64 * 1024];
                let _ = socket.read(&mut buffer).await;
                let response = format!(
                    "HTTP/1.1 {code} {phrase}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = socket.write_all(response.as_bytes()).await;
                let _ = socket.shutdown().await;
            }
        });
        format!("http://{addr}")
    }

    fn client_for(url: &str) -> kube::Client {
        let config = kube::Config::new(url.parse().expect("uri"));
        kube::Client::try_from(config).expect("client")
    }

    #[tokio::test]
    async fn forbidden_is_reported_with_the_rbac_hint() {
        let url = fake_api(
            403,
            "Forbidden",
            "configmaps \"rel-output\" is forbidden: User \"system:serviceaccount:ns:replay\" cannot patch resource",
        )
        .await;
        let error = upload(client_for(&url), "ns", "rel-output", "[]", BTreeMap::new())
            .await
            .expect_err("403");
        assert!(matches!(error, ArtifactError::Forbidden { .. }), "{error:?}");
        let text = error.to_string();
        assert!(
            text.contains("ns/rel-output") && text.contains("Role") && text.contains("cannot patch"),
            "{text}"
        );
    }

    #[tokio::test]
    async fn conflict_is_reported() {
        let url = fake_api(
            409,
            "Conflict",
            "Apply failed with 1 conflict: conflict with \"kubectl\"",
        )
        .await;
        let error = upload(client_for(&url), "ns", "rel-output", "[]", BTreeMap::new())
            .await
            .expect_err("409");
        assert!(matches!(error, ArtifactError::Conflict { .. }), "{error:?}");
        assert!(error.to_string().contains("conflict with \"kubectl\""), "{error}");
    }

    #[tokio::test]
    async fn an_unreachable_api_is_reported() {
        // A port that was just free: nothing listens there.
        let addr = std::net::TcpListener::bind("127.0.0.1:0")
            .expect("bind")
            .local_addr()
            .expect("addr");
        let error = upload(
            client_for(&format!("http://{addr}")),
            "ns",
            "rel-output",
            "[]",
            BTreeMap::new(),
        )
        .await
        .expect_err("unreachable");
        assert!(matches!(error, ArtifactError::Unreachable { .. }), "{error:?}");
        let text = error.to_string();
        assert!(
            text.contains("cannot reach the Kubernetes API") && text.contains("ns/rel-output"),
            "{text}"
        );
    }
}
