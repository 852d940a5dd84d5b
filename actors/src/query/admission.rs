//! Admission to the query dispatcher: a bounded number of Cube requests run, a bounded number
//! wait, and the rest are refused at once.

use std::sync::Arc;

/// Bounds the work handed to Cube: `running` requests at once, and room for `queued` more to
/// wait; anything beyond is refused at once instead of piling up in memory.
pub struct Admission {
    running: tokio::sync::Semaphore,
    admitted: std::sync::atomic::AtomicUsize,
    capacity: usize,
}

impl Admission {
    pub fn new(running: usize, queued: usize) -> Self {
        let running = running.max(1);
        Self {
            running: tokio::sync::Semaphore::new(running),
            admitted: std::sync::atomic::AtomicUsize::new(0),
            capacity: running + queued,
        }
    }

    /// A place among the admitted requests, or None when running and queue are full.
    pub fn enter(self: &Arc<Self>) -> Option<AdmissionTicket> {
        use std::sync::atomic::Ordering;
        let entered = self
            .admitted
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < self.capacity).then_some(n + 1)
            })
            .is_ok();
        entered.then(|| AdmissionTicket {
            admission: self.clone(),
        })
    }
}

/// Held while a request is queued or running; leaving frees its place.
pub struct AdmissionTicket {
    admission: Arc<Admission>,
}

impl AdmissionTicket {
    /// Waits for a running slot.
    pub async fn run<T>(&self, work: impl std::future::Future<Output = T>) -> T {
        let _slot = self
            .admission
            .running
            .acquire()
            .await
            .expect("the semaphore is never closed");
        work.await
    }
}

impl Drop for AdmissionTicket {
    fn drop(&mut self) {
        self.admission
            .admitted
            .fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn admission_sheds_beyond_running_and_queued() {
        let admission = Arc::new(Admission::new(1, 1));
        let first = admission.enter().expect("a running place");
        let second = admission.enter().expect("a queued place");
        assert!(admission.enter().is_none(), "full");
        drop(first);
        let third = admission.enter().expect("a place freed");
        assert_eq!(third.run(async { 7 }).await, 7);
        drop((second, third));
        assert!(admission.enter().is_some());
    }
}
