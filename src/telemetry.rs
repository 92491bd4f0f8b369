//! Logging and tracing setup, and W3C trace-context propagation.
//!
//! Logs: human-readable on a terminal, JSON lines otherwise, filtered by `RUST_LOG`.
//!
//! Traces: exported over OTLP/gRPC only when an endpoint is configured (`--otlp-endpoint` or
//! `OTEL_EXPORTER_OTLP_ENDPOINT`); the SDK reads `OTEL_SERVICE_NAME`, `OTEL_RESOURCE_ATTRIBUTES`
//! and `OTEL_TRACES_SAMPLER[_ARG]` itself. Without an endpoint no exporter exists, [`enabled`]
//! is false, and the instrumented code skips creating spans and propagating contexts, so
//! tracing off costs one relaxed atomic load per request.
//!
//! Several branches may share one process (`distbank run`), so the exporter reports each span
//! under its branch's own service name, `<service>-branch-<id>` (from the span's `branch.id`);
//! spans without a branch (the replay's) keep `<service>` (default `distbank`).

use std::collections::{BTreeMap, HashMap};
use std::io::IsTerminal as _;
use std::sync::atomic::{AtomicBool, Ordering};

use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator as _};
use opentelemetry::trace::{TraceContextExt as _, TracerProvider as _};
use opentelemetry::{Context, KeyValue, Value};
use opentelemetry_otlp::WithExportConfig as _;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{SdkTracerProvider, SpanData, SpanExporter};
use tonic::metadata::{KeyRef, MetadataKey, MetadataMap, MetadataValue};
use tracing_opentelemetry::OpenTelemetrySpanExt as _;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::Layer as _;
use tracing_subscriber::filter::Targets;
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;

/// How log lines look.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Text on a terminal, JSON otherwise.
    Auto,
    Text,
    Json,
}

/// Why telemetry could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    #[error("cannot install the log subscriber: {0}")]
    Subscriber(#[from] tracing_subscriber::util::TryInitError),
    #[error("OTLP endpoint {endpoint:?}: {source}")]
    Exporter {
        endpoint: String,
        #[source]
        source: opentelemetry_otlp::ExporterBuildError,
    },
}

/// The span attribute that selects a span's service name (see the module docs).
pub const BRANCH_ID: &str = "branch.id";
/// The W3C trace-context header (also the key inside a replicated log entry's context).
const TRACEPARENT: &str = "traceparent";

static ENABLED: AtomicBool = AtomicBool::new(false);

/// Whether spans are exported (an OTLP endpoint is configured). Instrumented code checks this
/// before building spans or propagating contexts.
#[inline]
pub fn enabled() -> bool {
    ENABLED.load(Ordering::Relaxed)
}

/// The default filter: our own events at `default_level`; openraft's at warn, because it logs
/// every failed RPC to an unreachable peer at error level during normal elections.
pub fn default_filter(default_level: &str) -> String {
    format!("{default_level},openraft=error,h2=warn,tower=warn,hyper=warn")
}

/// Keeps the tracer provider; [`Telemetry::shutdown`] flushes the spans still buffered.
#[must_use = "call shutdown() before exiting, or buffered spans are lost"]
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

impl Telemetry {
    /// Flushes and stops the exporter (blocking: call it outside async code, or through
    /// `spawn_blocking`, while the Tokio runtime still runs).
    pub fn shutdown(self) {
        if let Some(provider) = self.provider {
            ENABLED.store(false, Ordering::Relaxed);
            if let Err(e) = provider.shutdown() {
                eprintln!("distbank: flushing traces: {e}");
            }
        }
    }
}

/// Installs the global subscriber (logs go to stderr; stdout is for results) and, with an
/// OTLP endpoint, the span exporter. Must run inside a Tokio runtime when `otlp_endpoint` is
/// set (the gRPC channel needs one).
pub fn init(format: LogFormat, default_level: &str, otlp_endpoint: Option<&str>) -> Result<Telemetry, TelemetryError> {
    let provider = otlp_endpoint
        .filter(|endpoint| !endpoint.trim().is_empty())
        .map(|endpoint| {
            let exporter = opentelemetry_otlp::SpanExporter::builder()
                .with_tonic()
                .with_endpoint(endpoint.trim())
                .build()
                .map_err(|source| TelemetryError::Exporter {
                    endpoint: endpoint.to_string(),
                    source,
                })?;
            let service = std::env::var("OTEL_SERVICE_NAME")
                .ok()
                .filter(|name| !name.trim().is_empty())
                .unwrap_or_else(|| "distbank".to_string());
            Ok::<_, TelemetryError>(
                SdkTracerProvider::builder()
                    .with_batch_exporter(PerBranchExporter::new(exporter))
                    .with_resource(Resource::builder().with_service_name(service).build())
                    .build(),
            )
        })
        .transpose()?;
    // Per-layer filters: RUST_LOG (or the quiet default of `run`) governs the logs only; the
    // OTel layer always gets our own info spans, else a `run` at warn would export nothing.
    let otel = provider.as_ref().map(|provider| {
        tracing_opentelemetry::layer()
            .with_tracer(provider.tracer("distbank"))
            .with_filter(Targets::new().with_target("distbank", tracing::Level::INFO))
    });
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_filter(default_level)));
    let json = match format {
        LogFormat::Auto => !std::io::stderr().is_terminal(),
        LogFormat::Text => false,
        LogFormat::Json => true,
    };
    let registry = tracing_subscriber::registry().with(otel);
    if json {
        registry
            .with(
                tracing_subscriber::fmt::layer()
                    .json()
                    .with_writer(std::io::stderr)
                    .with_filter(filter),
            )
            .try_init()?;
    } else {
        registry
            .with(
                tracing_subscriber::fmt::layer()
                    .with_writer(std::io::stderr)
                    .with_filter(filter),
            )
            .try_init()?;
    }
    ENABLED.store(provider.is_some(), Ordering::Relaxed);
    Ok(Telemetry { provider })
}

struct MetadataInjector<'a>(&'a mut MetadataMap);

impl Injector for MetadataInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        if let (Ok(key), Ok(value)) = (MetadataKey::from_bytes(key.as_bytes()), MetadataValue::try_from(&value)) {
            self.0.insert(key, value);
        }
    }
}

struct MetadataExtractor<'a>(&'a MetadataMap);

impl Extractor for MetadataExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|value| value.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0
            .keys()
            .filter_map(|key| match key {
                KeyRef::Ascii(key) => Some(key.as_str()),
                KeyRef::Binary(_) => None,
            })
            .collect()
    }
}

/// Adds the current span's trace context to outgoing gRPC metadata (no-op with tracing off).
pub fn inject_metadata(metadata: &mut MetadataMap) {
    if enabled() {
        let context = tracing::Span::current().context();
        TraceContextPropagator::new().inject_context(&context, &mut MetadataInjector(metadata));
    }
}

/// Makes `span` a child of the trace context in incoming gRPC metadata, if there is one.
pub fn set_parent_from_metadata(span: &tracing::Span, metadata: &MetadataMap) {
    if enabled() {
        set_parent(
            span,
            TraceContextPropagator::new().extract(&MetadataExtractor(metadata)),
        );
    }
}

/// The current span's W3C `traceparent`, to carry inside a replicated log entry; `None` with
/// tracing off or outside a sampled span.
pub fn current_traceparent() -> Option<String> {
    if !enabled() {
        return None;
    }
    let context = tracing::Span::current().context();
    if !context.span().span_context().is_valid() {
        return None;
    }
    let mut carrier = HashMap::with_capacity(2);
    TraceContextPropagator::new().inject_context(&context, &mut carrier);
    carrier.remove(TRACEPARENT)
}

/// Makes `span` a child of the context a log entry carried.
pub fn set_parent_from_traceparent(span: &tracing::Span, traceparent: &str) {
    let carrier: HashMap<String, String> = [(TRACEPARENT.to_string(), traceparent.to_string())].into();
    set_parent(span, TraceContextPropagator::new().extract(&carrier));
}

fn set_parent(span: &tracing::Span, context: Context) {
    if context.span().span_context().is_valid() {
        // Fails only when the span is already started or disabled; then it has no parent.
        let _ = span.set_parent(context);
        span.record(
            "trace_id",
            tracing::field::display(span.context().span().span_context().trace_id()),
        );
    }
}

/// Records the current trace id on `span` (declared with `trace_id = Empty`), so JSON log
/// lines inside it carry the id to look the trace up by.
pub fn record_trace_id(span: &tracing::Span) {
    if enabled() {
        let trace_id = span.context().span().span_context().trace_id();
        span.record("trace_id", tracing::field::display(trace_id));
    }
}

/// Wraps the OTLP exporter so that each branch's spans go out under that branch's service
/// name: one OTLP request per branch in a batch, each with its own resource.
#[derive(Debug)]
struct PerBranchExporter {
    inner: futures::lock::Mutex<opentelemetry_otlp::SpanExporter>,
    base: Resource,
    resources: std::sync::Mutex<HashMap<i64, Resource>>,
}

impl PerBranchExporter {
    fn new(inner: opentelemetry_otlp::SpanExporter) -> PerBranchExporter {
        PerBranchExporter {
            inner: futures::lock::Mutex::new(inner),
            base: Resource::builder_empty().build(),
            resources: Default::default(),
        }
    }

    fn resource(&self, branch: Option<i64>) -> Resource {
        let Some(branch) = branch else {
            return self.base.clone();
        };
        let mut resources = self.resources.lock().unwrap_or_else(|p| p.into_inner());
        resources
            .entry(branch)
            .or_insert_with(|| {
                let service = match self.base.get(&opentelemetry::Key::from_static_str("service.name")) {
                    Some(name) => format!("{name}-branch-{branch}"),
                    None => format!("distbank-branch-{branch}"),
                };
                let attributes = self
                    .base
                    .iter()
                    .map(|(key, value)| KeyValue::new(key.clone(), value.clone()));
                Resource::builder_empty()
                    .with_attributes(attributes)
                    .with_service_name(service)
                    .with_attribute(KeyValue::new("service.instance.id", format!("branch-{branch}")))
                    .build()
            })
            .clone()
    }
}

fn branch_of(span: &SpanData) -> Option<i64> {
    span.attributes
        .iter()
        .find(|kv| kv.key.as_str() == BRANCH_ID)
        .and_then(|kv| match &kv.value {
            Value::I64(id) => Some(*id),
            Value::String(text) => text.as_str().parse().ok(),
            _ => None,
        })
}

impl SpanExporter for PerBranchExporter {
    async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
        let mut groups: BTreeMap<Option<i64>, Vec<SpanData>> = BTreeMap::new();
        for span in batch {
            groups.entry(branch_of(&span)).or_default().push(span);
        }
        let mut inner = self.inner.lock().await;
        let mut result = Ok(());
        for (branch, spans) in groups {
            inner.set_resource(&self.resource(branch));
            if let Err(e) = inner.export(spans).await {
                result = Err(e);
            }
        }
        result
    }

    fn shutdown_with_timeout(&self, timeout: std::time::Duration) -> OTelSdkResult {
        match self.inner.try_lock() {
            Some(inner) => inner.shutdown_with_timeout(timeout),
            None => Ok(()),
        }
    }

    fn force_flush(&self) -> OTelSdkResult {
        match self.inner.try_lock() {
            Some(inner) => inner.force_flush(),
            None => Ok(()),
        }
    }

    fn set_resource(&mut self, resource: &Resource) {
        self.base = resource.clone();
        self.resources.get_mut().unwrap_or_else(|p| p.into_inner()).clear();
        self.inner.get_mut().set_resource(resource);
    }
}
