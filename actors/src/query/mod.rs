//! The query path: a project's Cube REST calls go through the dispatcher, a ractor factory
//! whose pool of workers sends them upstream with a security-context token the gateway signs,
//! so the database is always the authenticated tenant's own. The factory's queue is bounded
//! (beyond it requests are shed at once), a request waits in it for a bounded time, and a
//! worker stuck on one request longer than any request may take is killed and replaced.
//!
//! [`Queries`] is the callers' side: the per-tenant result cache and the server-side wait for
//! "Continue wait" run on the caller's task, so neither holds a worker.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use ractor::factory::queues::DefaultQueue;
use ractor::factory::routing::QueuerRouting;
use ractor::factory::{
    DeadMansSwitchConfiguration, DiscardHandler, DiscardMode, DiscardReason, DiscardSettings,
    Factory, FactoryArguments, FactoryMessage, Job, JobOptions, worker_builder,
};
use ractor::rpc::CallResult;
use ractor::{Actor, ActorCell, ActorProcessingErr, ActorRef};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::code::ErrorCode;
use crate::registry::ProjectRecord;
use crate::results::{CacheKey, ResultCache, is_continue_wait};

mod checks;
mod worker;

use crate::settings::CubeSettings;
use crate::signer::Signer;
pub use checks::check_request;
pub use worker::{CubeWorker, CubeWorkerArgs, QueryJob};

pub const QUERY_DISPATCHER: &str = "query-dispatcher";

/// Pause between asks while Cube answers "Continue wait" and the caller waits server-side.
const CONTINUE_WAIT_PAUSE: Duration = Duration::from_millis(250);

/// The Cube REST endpoints a project may call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CubeEndpoint {
    Load,
    Meta,
    DryRun,
    Sql,
}

impl CubeEndpoint {
    pub fn parse(name: &str) -> Option<Self> {
        match name {
            "load" => Some(Self::Load),
            "meta" => Some(Self::Meta),
            "dry-run" => Some(Self::DryRun),
            "sql" => Some(Self::Sql),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Load => "load",
            Self::Meta => "meta",
            Self::DryRun => "dry-run",
            Self::Sql => "sql",
        }
    }
}

/// An instance's places at Cube: its requests running there or queued for it, bounded so that
/// one instance's slow dashboards cannot take the whole dispatcher. Answers from the result
/// cache, and callers sharing another's request, take none.
#[derive(Debug, Clone)]
pub struct QueryShare {
    places: Arc<Semaphore>,
    limit: u32,
}

impl QueryShare {
    pub fn new(limit: u32) -> Self {
        Self {
            places: Arc::new(Semaphore::new(limit as usize)),
            limit,
        }
    }

    /// Whether any of the instance's requests is at Cube or queued for it.
    pub fn in_use(&self) -> bool {
        self.places.available_permits() < self.limit as usize
    }

    fn take(&self) -> Result<OwnedSemaphorePermit, QueryError> {
        Arc::clone(&self.places).try_acquire_owned().map_err(|_| {
            metrics::counter!("monitor_gateway_queries_refused_total", "reason" => "concurrency")
                .increment(1);
            QueryError::TooManyQueries(self.limit)
        })
    }
}

#[derive(Debug, Clone)]
pub struct CubeRequest {
    pub project: ProjectRecord,
    /// The places of the project's instance.
    pub share: QueryShare,
    pub endpoint: CubeEndpoint,
    /// POST with `body`, or GET with `query_string`.
    pub post: bool,
    pub query_string: Option<String>,
    pub body: Bytes,
    pub request_id: String,
    /// Ask Cube even when a recent answer is kept (the caller sent `Cache-Control: no-cache`).
    pub bypass_cache: bool,
    /// Ask again while Cube answers "Continue wait", for up to this long (`Prefer: wait=N`).
    pub wait_for_result: Option<Duration>,
}

/// A successful Cube answer, passed on as it came ("Continue wait" included).
#[derive(Debug, Clone)]
pub struct CubeResponse {
    pub status: u16,
    pub content_type: Option<String>,
    pub body: Bytes,
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum QueryError {
    #[error("{0}")]
    InvalidQuery(String),
    #[error("the project's database does not exist")]
    ProjectMissing,
    #[error("Cube is unavailable: {0}")]
    Upstream(String),
    #[error("Cube did not answer within the deadline")]
    Timeout,
    #[error("too many queries are waiting for Cube; retry shortly")]
    Overloaded,
    #[error("the query waited too long for Cube; retry shortly")]
    QueueTimeout,
    #[error("the query dispatcher is unavailable")]
    Unavailable,
    #[error(
        "this instance already has {0} queries at Cube or waiting for it, the most allowed; \
         retry when one ends"
    )]
    TooManyQueries(u32),
}

impl QueryError {
    pub fn code(&self) -> ErrorCode {
        match self {
            Self::InvalidQuery(_) => ErrorCode::InvalidQuery,
            Self::ProjectMissing => ErrorCode::ProjectNotOnboarded,
            Self::Upstream(_) | Self::Unavailable => ErrorCode::UpstreamUnavailable,
            Self::Timeout => ErrorCode::UpstreamTimeout,
            Self::Overloaded | Self::QueueTimeout => ErrorCode::Overloaded,
            Self::TooManyQueries(_) => ErrorCode::RateLimited,
        }
    }
}

/// The dispatcher's messages: ractor's factory protocol carrying [`QueryJob`]s.
pub type DispatcherMsg = FactoryMessage<(), QueryJob>;

type Dispatcher = Factory<
    (),
    QueryJob,
    CubeWorkerArgs,
    CubeWorker,
    QueuerRouting<(), QueryJob>,
    DefaultQueue<(), QueryJob>,
>;

/// Starts the dispatcher under `supervisor`: `cube.max_concurrent_queries` workers and a queue
/// of `cube.max_queued_queries`.
pub async fn spawn_dispatcher(
    cube: &CubeSettings,
    signer: Arc<Signer>,
    supervisor: ActorCell,
) -> Result<ActorRef<DispatcherMsg>, ActorProcessingErr> {
    let start = CubeWorkerArgs {
        cube: Arc::new(cube.clone()),
        signer,
    };
    let stuck = DeadMansSwitchConfiguration::builder()
        .detection_timeout(Duration::from_secs(cube.stuck_worker_seconds))
        .kill_worker(true)
        .build();
    let args = FactoryArguments::builder()
        .worker_builder(Box::new(worker_builder(move |_wid| {
            (CubeWorker, start.clone())
        })))
        .num_initial_workers(cube.max_concurrent_queries.max(1))
        .router(QueuerRouting::default())
        .queue(DefaultQueue::default())
        .discard_settings(DiscardSettings::Static {
            limit: cube.max_queued_queries,
            mode: DiscardMode::Newest,
        })
        .discard_handler(Arc::new(Shed))
        .dead_mans_switch(stuck)
        .build();
    let (dispatcher, _) = Actor::spawn_linked(
        Some(QUERY_DISPATCHER.into()),
        Dispatcher::default(),
        args,
        supervisor,
    )
    .await?;
    Ok(dispatcher)
}

/// Answers the jobs the dispatcher drops instead of leaving their callers to time out.
struct Shed;

impl DiscardHandler<(), QueryJob> for Shed {
    fn discard(&self, reason: DiscardReason, job: &mut Job<(), QueryJob>) {
        let (reason, answer) = match reason {
            DiscardReason::TtlExpired => ("expired", QueryError::QueueTimeout),
            DiscardReason::Shutdown => ("shutdown", QueryError::Unavailable),
            DiscardReason::Loadshed | DiscardReason::RateLimited => {
                ("queue_full", QueryError::Overloaded)
            }
        };
        metrics::counter!("monitor_gateway_queries_shed_total", "reason" => reason).increment(1);
        job.msg.answer(Err(answer));
    }
}

/// How the edge reaches the dispatcher, whichever incarnation of it is running. The result
/// cache and the wait for a result live here, on the caller's task.
#[derive(Clone)]
pub struct Queries {
    results: Option<Arc<ResultCache>>,
    /// How long a request may wait in the dispatcher's queue before it is shed.
    queue_timeout: Duration,
    /// How long a caller waits for one dispatched request: queued, then sent to Cube.
    deadline: Duration,
}

impl Queries {
    pub fn new(cube: &CubeSettings) -> Self {
        let window = Duration::from_secs(cube.result_cache_seconds);
        let results = (!window.is_zero())
            .then(|| Arc::new(ResultCache::new(window, cube.result_cache_capacity)));
        let queue_timeout = Duration::from_secs(cube.queue_timeout_seconds);
        Self {
            results,
            queue_timeout,
            deadline: queue_timeout + Duration::from_secs(cube.timeout_seconds + 1),
        }
    }

    /// Cube's answer, asked again while it says "Continue wait" if the caller wants to wait.
    pub async fn forward(&self, request: CubeRequest) -> Result<CubeResponse, QueryError> {
        let Some(wait) = request.wait_for_result else {
            return self.answer_once(request).await;
        };
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let answer = self.answer_once(request.clone()).await?;
            if !is_continue_wait(&answer)
                || tokio::time::Instant::now() + CONTINUE_WAIT_PAUSE > deadline
            {
                return Ok(answer);
            }
            tokio::time::sleep(CONTINUE_WAIT_PAUSE).await;
        }
    }

    /// From the result cache when the request may be, else from Cube.
    async fn answer_once(&self, request: CubeRequest) -> Result<CubeResponse, QueryError> {
        let cached = self.results.as_ref().zip(CacheKey::of(&request));
        match cached {
            Some((results, key)) if request.bypass_cache => {
                results.refresh(key, self.dispatch(request)).await
            }
            Some((results, key)) => results.get_or_fetch(key, self.dispatch(request)).await,
            None => self.dispatch(request).await,
        }
    }

    /// One request through the dispatcher's queue and one of its workers.
    async fn dispatch(&self, request: CubeRequest) -> Result<CubeResponse, QueryError> {
        // Travels with the job, so it is held for as long as Cube works on the request, even
        // if this caller stops waiting.
        let place = request.share.take()?;
        let dispatcher: ActorRef<DispatcherMsg> = ractor::registry::where_is(QUERY_DISPATCHER)
            .ok_or(QueryError::Unavailable)?
            .into();
        let request = Box::new(request);
        let answer = dispatcher
            .call_job_with_options(
                (),
                |reply| QueryJob {
                    request,
                    reply: Some(reply),
                    place,
                },
                JobOptions::new(Some(self.queue_timeout)),
                Some(self.deadline),
            )
            .await;
        match answer {
            Ok(CallResult::Success(result)) => result,
            Ok(CallResult::Timeout) => Err(QueryError::Timeout),
            // The worker holding the request stopped (it was stuck and replaced, or failed).
            Ok(CallResult::SenderError) | Err(_) => Err(QueryError::Unavailable),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;
    use crate::tenancy::{InstanceId, ProjectId};

    /// A stand-in for Cube on loopback: `sql` never answers (a hung upstream), anything else
    /// answers at once.
    async fn cube_stub() -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move {
            while let Ok((mut socket, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let mut head = vec![0; 4096];
                    let read = socket.read(&mut head).await.unwrap_or(0);
                    if String::from_utf8_lossy(&head[..read]).contains("/v1/sql") {
                        tokio::time::sleep(Duration::from_secs(600)).await;
                    }
                    let body = r#"{"cubes":[]}"#;
                    let answer = format!(
                        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n\
                         content-length: {}\r\n\r\n{body}",
                        body.len()
                    );
                    let _ = socket.write_all(answer.as_bytes()).await;
                });
            }
        });
        url
    }

    fn settings(url: &str, queued: usize, queue_seconds: u64, stuck_seconds: u64) -> CubeSettings {
        CubeSettings {
            url: url.to_owned(),
            timeout_seconds: 300,
            token_issuer: "monitor-gateway".into(),
            token_audience: "cube".into(),
            token_ttl_seconds: 60,
            max_concurrent_queries: 1,
            max_queued_queries: queued,
            queue_timeout_seconds: queue_seconds,
            stuck_worker_seconds: stuck_seconds,
            result_cache_seconds: 0,
            result_cache_capacity: 10,
        }
    }

    fn request(endpoint: CubeEndpoint) -> CubeRequest {
        let instance = InstanceId::parse("00000000-0000-0000-0000-000000000001").unwrap();
        CubeRequest {
            project: ProjectRecord::new(instance, ProjectId::new(1).unwrap()),
            share: QueryShare::new(100),
            endpoint,
            post: false,
            query_string: None,
            body: Bytes::new(),
            request_id: "test".into(),
            bypass_cache: false,
            wait_for_result: None,
        }
    }

    /// Starts the dispatcher (under a parent that does nothing) and the callers' handle.
    async fn dispatcher(cube: CubeSettings) -> Queries {
        struct Parent;
        impl Actor for Parent {
            type Msg = ();
            type State = ();
            type Arguments = ();
            async fn pre_start(&self, _: ActorRef<()>, _: ()) -> Result<(), ActorProcessingErr> {
                Ok(())
            }
        }
        let (parent, _) = Actor::spawn(None, Parent, ()).await.unwrap();
        let key = crate::signer::generate_key().unwrap();
        let signer = Arc::new(Signer::from_key(&key, &cube).unwrap());
        spawn_dispatcher(&cube, signer, parent.get_cell())
            .await
            .unwrap();
        Queries::new(&cube)
    }

    /// One test per process (nextest), since the dispatcher has a global name; the cases run
    /// one after another against fresh dispatchers.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_dispatcher_sheds_expires_and_replaces_stuck_workers() {
        let url = cube_stub().await;

        // A stuck worker is killed and replaced; its caller gets a clean error and the request
        // queued behind it is served by the replacement.
        let queries = dispatcher(settings(&url, 4, 30, 2)).await;
        let started = Instant::now();
        let (stuck, queued) = tokio::join!(queries.forward(request(CubeEndpoint::Sql)), async {
            tokio::time::sleep(Duration::from_millis(100)).await;
            queries.forward(request(CubeEndpoint::Meta)).await
        });
        assert!(matches!(stuck, Err(QueryError::Unavailable)), "{stuck:?}");
        assert_eq!(&queued.unwrap().body[..], br#"{"cubes":[]}"#);
        assert!(started.elapsed() < Duration::from_secs(20));
        let after = queries.forward(request(CubeEndpoint::Meta)).await.unwrap();
        assert_eq!(after.status, 200);
        stop_dispatcher().await;

        // With every worker busy and no queue, a request is refused at once.
        let queries = dispatcher(settings(&url, 0, 30, 30)).await;
        let hung = tokio::spawn({
            let queries = queries.clone();
            async move { queries.forward(request(CubeEndpoint::Sql)).await }
        });
        tokio::time::sleep(Duration::from_millis(200)).await;
        let started = Instant::now();
        let shed = queries.forward(request(CubeEndpoint::Meta)).await;
        assert!(matches!(shed, Err(QueryError::Overloaded)), "{shed:?}");
        assert!(started.elapsed() < Duration::from_secs(1));

        // A queued request that finds no worker within the queue timeout is refused.
        hung.abort();
        stop_dispatcher().await;
        let queries = dispatcher(settings(&url, 4, 1, 30)).await;
        let _hung = tokio::spawn({
            let queries = queries.clone();
            async move { queries.forward(request(CubeEndpoint::Sql)).await }
        });
        tokio::time::sleep(Duration::from_millis(200)).await;
        let started = Instant::now();
        let expired = queries.forward(request(CubeEndpoint::Meta)).await;
        assert!(
            matches!(expired, Err(QueryError::QueueTimeout)),
            "{expired:?}"
        );
        assert!(started.elapsed() < Duration::from_secs(5));
    }

    async fn stop_dispatcher() {
        let cell = ractor::registry::where_is(QUERY_DISPATCHER).unwrap();
        // Killed, not stopped: a stop would wait for the worker hung on the stub.
        cell.kill_and_wait(Some(Duration::from_secs(5)))
            .await
            .unwrap();
    }

    #[test]
    fn only_known_endpoints_parse() {
        for name in ["load", "meta", "dry-run", "sql"] {
            assert_eq!(CubeEndpoint::parse(name).unwrap().as_str(), name);
        }
        assert!(CubeEndpoint::parse("../load").is_none());
        assert!(CubeEndpoint::parse("subscribe").is_none());
    }
}
