//! Group flushing for writes made outside the committer (delivery acks, dead letters, repairs):
//! every caller waiting when a flush starts shares it.

use std::sync::Arc;

use tokio::sync::{mpsc, oneshot};

use super::Store;

#[derive(Clone)]
pub struct Flusher {
    requests: mpsc::UnboundedSender<oneshot::Sender<Result<(), String>>>,
}

impl Flusher {
    pub fn start(store: Arc<Store>) -> Flusher {
        let (requests, mut receiver) =
            mpsc::unbounded_channel::<oneshot::Sender<Result<(), String>>>();
        std::thread::Builder::new()
            .name("outpost-flusher".into())
            .spawn(move || {
                while let Some(first) = receiver.blocking_recv() {
                    let mut waiters = vec![first];
                    while let Ok(more) = receiver.try_recv() {
                        waiters.push(more);
                    }
                    let result = store.flush().map_err(|e| e.to_string());
                    for waiter in waiters {
                        let _ = waiter.send(result.clone());
                    }
                }
            })
            .expect("spawning the flusher thread");
        Flusher { requests }
    }

    /// Returns once every write made before the call is durable.
    pub async fn flush(&self) -> Result<(), String> {
        let (reply, answer) = oneshot::channel();
        self.requests
            .send(reply)
            .map_err(|_| "the flusher has stopped".to_owned())?;
        answer
            .await
            .map_err(|_| "the flusher has stopped".to_owned())?
    }
}
