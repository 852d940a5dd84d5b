//! Registry rows are written in batches: every row queued while one INSERT is in flight goes
//! into the next one. A ClickHouse INSERT costs about the same for one row as for many, so
//! concurrent onboardings share them, and a lone row waits for nothing.

use std::time::Duration;

use clickhouse::Client;
use tokio::sync::{mpsc, oneshot};
use tracing::warn;

use super::{ProjectRow, RegistryError};

/// Rows in one INSERT at most.
const MAX_BATCH: usize = 1_000;
/// Rows waiting at most; callers beyond it wait for room.
const QUEUE: usize = 10_000;

struct Pending {
    row: ProjectRow,
    done: oneshot::Sender<Result<(), String>>,
}

#[derive(Clone)]
pub(super) struct Writer {
    queue: mpsc::Sender<Pending>,
}

impl Writer {
    /// Starts the writing task; it ends when the last `Writer` is dropped.
    pub(super) fn start(client: Client, timeout: Duration) -> Self {
        let (queue, rows) = mpsc::channel(QUEUE);
        tokio::spawn(write_batches(client, timeout, rows));
        Self { queue }
    }

    /// Resolves once the row is stored, or with the error of the INSERT that carried it.
    pub(super) async fn write(&self, row: ProjectRow) -> Result<(), RegistryError> {
        let (done, stored) = oneshot::channel();
        let stopped = || RegistryError::Write("the registry writer stopped".to_owned());
        self.queue
            .send(Pending { row, done })
            .await
            .map_err(|_| stopped())?;
        stored
            .await
            .map_err(|_| stopped())?
            .map_err(RegistryError::Write)
    }
}

async fn write_batches(client: Client, timeout: Duration, mut rows: mpsc::Receiver<Pending>) {
    let mut batch = Vec::new();
    while rows.recv_many(&mut batch, MAX_BATCH).await > 0 {
        let outcome = match tokio::time::timeout(timeout, insert(&client, &batch)).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(err)) => Err(format!("ClickHouse request failed: {err}")),
            Err(_) => Err(format!("ClickHouse did not answer within {timeout:?}")),
        };
        if let Err(err) = &outcome {
            warn!(rows = batch.len(), error = %err, "registry write failed");
        }
        metrics::histogram!("monitor_gateway_registry_batch_rows").record(batch.len() as f64);
        for pending in batch.drain(..) {
            let _ = pending.done.send(outcome.clone());
        }
    }
}

async fn insert(client: &Client, batch: &[Pending]) -> Result<(), clickhouse::error::Error> {
    let mut insert = client.insert::<ProjectRow>("projects").await?;
    for pending in batch {
        insert.write(&pending.row).await?;
    }
    insert.end().await
}
