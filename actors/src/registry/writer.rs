//! Registry rows are written in batches. On ClickHouse every INSERT makes a new part on disk,
//! which costs about as much as creating a tenant's database, whether it holds one row or many;
//! so concurrent onboardings share INSERTs.
//!
//! One INSERT runs at a time, so the rows queued while it runs share the next one. A row
//! someone waits for is written after at most the batch wait, with every row queued meanwhile. A row written behind an answer waits longer ([`BEHIND_WAIT`]) and usually rides
//! along with the next INSERT somebody waits for.

use std::time::Duration;

use clickhouse::Client;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tracing::warn;

use super::{ProjectRow, RegistryError};

/// Rows in one INSERT at most.
const MAX_BATCH: usize = 1_000;
/// Rows waiting at most; callers beyond it wait for room.
const QUEUE: usize = 10_000;
/// How long rows nobody waits for may wait for a batch to join.
const BEHIND_WAIT: Duration = Duration::from_millis(100);

struct Pending {
    /// None for a flush, which only waits for the rows queued before it.
    row: Option<ProjectRow>,
    done: oneshot::Sender<Result<(), String>>,
    /// Somebody waits for it, so it is written after the short wait.
    urgent: bool,
}

/// Resolves once a row written behind an answer is stored, or with the error of its INSERT.
pub struct Written(oneshot::Receiver<Result<(), String>>);

impl Written {
    pub async fn stored(self) -> Result<(), RegistryError> {
        self.0
            .await
            .map_err(|_| RegistryError::Write("the registry writer stopped".to_owned()))?
            .map_err(RegistryError::Write)
    }
}

#[derive(Clone)]
pub(super) struct Writer {
    queue: mpsc::Sender<Pending>,
}

impl Writer {
    /// Starts the writing task; it ends when the last `Writer` is dropped, after writing
    /// every row queued before.
    pub(super) fn start(client: Client, timeout: Duration, batch_wait: Duration) -> Self {
        let (queue, rows) = mpsc::channel(QUEUE);
        tokio::spawn(write_batches(client, timeout, batch_wait, rows));
        Self { queue }
    }

    /// Resolves once the row is stored, or with the error of the INSERT that carried it.
    pub(super) async fn write(&self, row: ProjectRow) -> Result<(), RegistryError> {
        self.enqueue(Some(row), true).await?.stored().await
    }

    /// Resolves once every row queued before is written; an error when an INSERT failed since
    /// the last flush.
    pub(super) async fn flush(&self) -> Result<(), RegistryError> {
        self.enqueue(None, true).await?.stored().await
    }

    /// Queues the row to be written with the next batch; the answer says when it is stored.
    pub(super) async fn write_behind(&self, row: ProjectRow) -> Result<Written, RegistryError> {
        self.enqueue(Some(row), false).await
    }

    async fn enqueue(
        &self,
        row: Option<ProjectRow>,
        urgent: bool,
    ) -> Result<Written, RegistryError> {
        let (done, stored) = oneshot::channel();
        self.queue
            .send(Pending { row, done, urgent })
            .await
            .map_err(|_| RegistryError::Write("the registry writer stopped".to_owned()))?;
        Ok(Written(stored))
    }
}

async fn write_batches(
    client: Client,
    timeout: Duration,
    batch_wait: Duration,
    mut rows: mpsc::Receiver<Pending>,
) {
    let mut batch = Vec::new();
    // The last INSERT that failed since a flush last answered, which that flush reports.
    let mut failed_since_flush = None;
    while rows.recv_many(&mut batch, MAX_BATCH).await > 0 {
        gather(&mut rows, &mut batch, batch_wait).await;
        let rows_in_batch = batch.iter().filter(|p| p.row.is_some()).count();
        let outcome = if rows_in_batch == 0 {
            Ok(())
        } else {
            match tokio::time::timeout(timeout, insert(&client, &batch)).await {
                Ok(Ok(())) => Ok(()),
                Ok(Err(err)) => Err(format!("ClickHouse request failed: {err}")),
                Err(_) => Err(format!("ClickHouse did not answer within {timeout:?}")),
            }
        };
        if let Err(err) = &outcome {
            warn!(rows = rows_in_batch, error = %err, "registry write failed");
            metrics::counter!("monitor_gateway_registry_write_failures_total").increment(1);
        }
        if rows_in_batch > 0 {
            metrics::histogram!("monitor_gateway_registry_batch_rows").record(rows_in_batch as f64);
        }
        if let Err(err) = &outcome {
            failed_since_flush = Some(err.clone());
        }
        let flushed = failed_since_flush.clone().map_or(Ok(()), Err);
        for pending in batch.drain(..) {
            if pending.row.is_some() {
                let _ = pending.done.send(outcome.clone());
            } else {
                let _ = pending.done.send(flushed.clone());
                failed_since_flush = None;
            }
        }
    }
}

/// Adds the rows that arrive until the batch is due: the batch wait after the first urgent
/// row, [`BEHIND_WAIT`] after the first row while none is urgent, or when it is full.
async fn gather(
    rows: &mut mpsc::Receiver<Pending>,
    batch: &mut Vec<Pending>,
    batch_wait: Duration,
) {
    let started = Instant::now();
    let urgent_by = started + batch_wait;
    let mut deadline = started + BEHIND_WAIT;
    let mut seen = 0;
    while batch.len() < MAX_BATCH {
        if batch[seen..].iter().any(|p| p.urgent) {
            deadline = deadline.min(urgent_by);
        }
        seen = batch.len();
        tokio::select! {
            biased;
            () = tokio::time::sleep_until(deadline) => break,
            received = rows.recv_many(batch, MAX_BATCH - batch.len()) => {
                if received == 0 {
                    break;
                }
            }
        }
    }
}

async fn insert(client: &Client, batch: &[Pending]) -> Result<(), clickhouse::error::Error> {
    let mut insert = client.insert::<ProjectRow>("projects").await?;
    for row in batch.iter().filter_map(|p| p.row.as_ref()) {
        insert.write(row).await?;
    }
    insert.end().await
}
