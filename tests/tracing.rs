//! One trace per customer event across every branch: `distbank run --otlp-endpoint` against an
//! in-process OTLP/gRPC receiver, then the span tree is checked — the replay's span is the
//! root, the customer's branch's `Bank/MsgDelivery` is its child, and every branch applies
//! each write in exactly one span of the same trace, reported under its own service name.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{TraceService, TraceServiceServer};
use opentelemetry_proto::tonic::collector::trace::v1::{ExportTraceServiceRequest, ExportTraceServiceResponse};
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue};
use tokio_stream::wrappers::TcpListenerStream;

/// A span as received, with the service name of its resource.
#[derive(Debug, Clone)]
struct Received {
    service: String,
    name: String,
    trace_id: Vec<u8>,
    span_id: Vec<u8>,
    parent: Vec<u8>,
    attributes: BTreeMap<String, String>,
}

#[derive(Default, Clone)]
struct Receiver {
    spans: Arc<Mutex<Vec<Received>>>,
}

fn text(value: &Option<AnyValue>) -> String {
    match value.as_ref().and_then(|v| v.value.as_ref()) {
        Some(Value::StringValue(s)) => s.clone(),
        Some(Value::IntValue(i)) => i.to_string(),
        Some(Value::BoolValue(b)) => b.to_string(),
        Some(Value::DoubleValue(d)) => d.to_string(),
        other => format!("{other:?}"),
    }
}

fn attributes(list: &[KeyValue]) -> BTreeMap<String, String> {
    list.iter().map(|kv| (kv.key.clone(), text(&kv.value))).collect()
}

#[tonic::async_trait]
impl TraceService for Receiver {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut spans = self.spans.lock().unwrap();
        for resource_spans in request.into_inner().resource_spans {
            let resource = attributes(
                &resource_spans
                    .resource
                    .as_ref()
                    .map(|r| r.attributes.clone())
                    .unwrap_or_default(),
            );
            let service = resource.get("service.name").cloned().unwrap_or_default();
            for scope in resource_spans.scope_spans {
                for span in scope.spans {
                    spans.push(Received {
                        service: service.clone(),
                        name: span.name,
                        trace_id: span.trace_id,
                        span_id: span.span_id,
                        parent: span.parent_span_id,
                        attributes: attributes(&span.attributes),
                    });
                }
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

const INPUT: &str = r#"[
  {"id": 1, "type": "customer", "events": [{"id": 1, "interface": "deposit", "money": 100}]},
  {"id": 2, "type": "customer", "events": [{"id": 2, "interface": "withdraw", "money": 30}, {"id": 3, "interface": "query"}]},
  {"id": 3, "type": "customer", "events": [{"id": 4, "interface": "deposit", "money": 5}]},
  {"id": 1, "type": "branch", "balance": 400},
  {"id": 2, "type": "branch", "balance": 400},
  {"id": 3, "type": "branch", "balance": 400}
]"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_trace_per_event_spans_every_branch() {
    let receiver = Receiver::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let endpoint = format!("http://{}", listener.local_addr().unwrap());
    let server = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(receiver.clone()))
            .serve_with_incoming(TcpListenerStream::new(listener)),
    );

    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("input.json");
    std::fs::write(&input, INPUT).unwrap();
    let output = dir.path().join("output.json");
    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_distbank"));
    command
        .arg("run")
        .arg(&input)
        .arg("--output")
        .arg(&output)
        .args(["--otlp-endpoint", &endpoint])
        .env("OTEL_SERVICE_NAME", "obs-test")
        .env("OTEL_RESOURCE_ATTRIBUTES", "deployment.environment=test")
        .env_remove("OTEL_TRACES_SAMPLER");
    let run = tokio::time::timeout(
        Duration::from_secs(180),
        tokio::task::spawn_blocking(move || command.output()),
    )
    .await
    .expect("distbank run finishes")
    .unwrap()
    .expect("distbank run starts");
    assert!(
        run.status.success(),
        "distbank run failed: {}",
        String::from_utf8_lossy(&run.stderr)
    );
    // The process flushed its spans before exiting, so everything has arrived by now.
    let spans = receiver.spans.lock().unwrap().clone();
    server.abort();
    assert!(!spans.is_empty(), "no spans received");

    for (event, customer, operation, apply_name) in [
        ("1", "1", "deposit", "apply PropagateDeposit"),
        ("2", "2", "withdraw", "apply PropagateWithdraw"),
        ("4", "3", "deposit", "apply PropagateDeposit"),
    ] {
        let roots: Vec<&Received> = spans
            .iter()
            .filter(|s| {
                s.name == format!("replay {operation}")
                    && s.attributes.get("event.id").map(String::as_str) == Some(event)
            })
            .collect();
        assert_eq!(roots.len(), 1, "one replay span for event {event}: {spans:#?}");
        let root = roots[0];
        assert!(root.parent.is_empty(), "the replay span is the root");
        assert_eq!(root.service, "obs-test");
        assert_eq!(root.attributes.get("customer.id").map(String::as_str), Some(customer));
        assert_eq!(root.attributes.get("result").map(String::as_str), Some("success"));

        let trace: Vec<&Received> = spans.iter().filter(|s| s.trace_id == root.trace_id).collect();
        let ids: BTreeSet<&[u8]> = trace.iter().map(|s| s.span_id.as_slice()).collect();
        for span in &trace {
            assert!(
                span.parent.is_empty() || ids.contains(span.parent.as_slice()),
                "span {} of event {event} has a parent outside the trace",
                span.name
            );
        }

        let deliveries: Vec<&&Received> = trace.iter().filter(|s| s.name == "Bank/MsgDelivery").collect();
        assert_eq!(deliveries.len(), 1, "one MsgDelivery for event {event}");
        let delivery = deliveries[0];
        assert_eq!(delivery.parent, root.span_id, "MsgDelivery is the replay span's child");
        assert_eq!(delivery.service, format!("obs-test-branch-{customer}"));
        for key in ["branch.id", "customer.id", "event.id", "operation", "amount", "result"] {
            assert!(delivery.attributes.contains_key(key), "MsgDelivery lacks {key}");
        }
        assert_eq!(delivery.attributes.get("result").map(String::as_str), Some("success"));

        let applies: Vec<&&Received> = trace.iter().filter(|s| s.name == apply_name).collect();
        let services: BTreeSet<String> = applies.iter().map(|s| s.service.clone()).collect();
        assert_eq!(
            applies.len(),
            3,
            "one apply span per branch for event {event}: {applies:#?}"
        );
        assert_eq!(
            services,
            (1..=3).map(|b| format!("obs-test-branch-{b}")).collect(),
            "every branch applies event {event}"
        );
        for apply in &applies {
            for key in ["branch.id", "event.id", "operation", "amount", "result"] {
                assert!(apply.attributes.contains_key(key), "apply span lacks {key}");
            }
            assert_eq!(apply.attributes.get("event.id").map(String::as_str), Some(event));
            assert_eq!(
                apply.attributes.get("branch.id"),
                apply
                    .service
                    .strip_prefix("obs-test-branch-")
                    .map(str::to_string)
                    .as_ref()
            );
            // Each apply descends from the customer's branch's MsgDelivery.
            let mut cursor = apply.parent.clone();
            let mut reached = false;
            while let Some(parent) = trace.iter().find(|s| s.span_id == cursor) {
                if parent.span_id == delivery.span_id {
                    reached = true;
                    break;
                }
                cursor = parent.parent.clone();
            }
            assert!(reached, "apply on {} is not below MsgDelivery", apply.service);
        }
    }
    // Queries are reads: no apply spans for them, but they are traced too.
    assert!(
        spans
            .iter()
            .any(|s| s.name == "Bank/MsgDelivery" && s.attributes.get("operation").map(String::as_str) == Some("query"))
    );
}
