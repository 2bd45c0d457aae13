//! Model shards: a model split into pipeline stages runs as a chain of shard actors.
//! Activations flow stage to stage, to an actor in this process or, when the next stage
//! sits on another host, over the data-plane transport (TCP, length-prefixed bincode).
//!
//! A shard computes on the compute pool, hands its output and the caller's reply port to
//! the next stage, and is free for the next request at once, so stages overlap across
//! requests. The last stage answers the caller.

use crate::compute::ComputePool;
use crate::runtime::RuntimeError;
use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};
use serde::{Deserialize, Serialize};
use std::net::SocketAddr;
use std::sync::Arc;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot};

/// Largest frame either side sends or accepts: a generous batch of hidden states for the
/// models a host serves; anything bigger is a corrupt or hostile length prefix.
pub const FRAME_BYTES_MAX: usize = 64 << 20;

/// Requests waiting for a remote stage's connection. A shard sends one request per
/// activation it produced; beyond this its caller gets `Overloaded`.
pub const REMOTE_QUEUE_CAPACITY: usize = 64;

/// Longest wait for a remote stage to connect or answer one request.
pub const REMOTE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// What passes between stages.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Activation {
    /// Token ids, into the first stage of a language model.
    Tokens(Vec<u32>),
    /// A dense f32 tensor, row-major.
    Hidden { shape: Vec<usize>, values: Vec<f32> },
}

/// One pipeline stage of a model. Blocking: runs on the compute pool.
pub trait Stage: Send + Sync + 'static {
    fn forward(&self, input: Activation) -> Result<Activation, RuntimeError>;
}

/// Why a sharded forward pass gave no result.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
pub enum ShardError {
    #[error("stage failed: {0}")]
    Stage(String),
    #[error("a shard stopped before answering")]
    Stopped,
    #[error("the remote stage's queue is full")]
    Overloaded,
    #[error("data-plane transport: {0}")]
    Transport(String),
}

/// Where a shard's output goes.
#[derive(Clone, Debug)]
pub enum Next {
    /// This is the last stage: answer the caller.
    Reply,
    /// A stage in this process.
    Local(ShardHandle),
    /// A stage on another host, reached through its data-plane address.
    Remote(RemoteStage),
}

pub struct ShardArgs {
    pub stage: Arc<dyn Stage>,
    pub next: Next,
    pub compute: ComputePool,
}

pub enum ShardMsg {
    Forward {
        input: Activation,
        reply: RpcReplyPort<Result<Activation, ShardError>>,
    },
}

/// The shard actor: stateless behaviour over [`ShardArgs`].
#[derive(Debug)]
pub struct Shard;

impl Actor for Shard {
    type Msg = ShardMsg;
    type State = ShardArgs;
    type Arguments = ShardArgs;

    async fn pre_start(
        &self,
        _myself: ActorRef<ShardMsg>,
        args: ShardArgs,
    ) -> Result<ShardArgs, ActorProcessingErr> {
        Ok(args)
    }

    async fn handle(
        &self,
        _myself: ActorRef<ShardMsg>,
        message: ShardMsg,
        state: &mut ShardArgs,
    ) -> Result<(), ActorProcessingErr> {
        let ShardMsg::Forward { input, reply } = message;
        let stage = Arc::clone(&state.stage);
        let output = match state.compute.run(move || stage.forward(input)).await {
            Ok(Ok(output)) => output,
            Ok(Err(error)) => {
                let _ = reply.send(Err(ShardError::Stage(error.to_string())));
                return Ok(());
            }
            Err(error) => {
                let _ = reply.send(Err(ShardError::Stage(error.to_string())));
                return Ok(());
            }
        };
        match &state.next {
            Next::Reply => {
                let _ = reply.send(Ok(output));
            }
            Next::Local(next) => {
                // Hand over the caller's reply port: this shard is free for the next request.
                if let Err(error) = next.actor.cast(ShardMsg::Forward {
                    input: output,
                    reply,
                }) {
                    tracing::warn!(%error, "next shard is gone");
                }
            }
            Next::Remote(remote) => {
                let remote = remote.clone();
                tokio::spawn(async move {
                    let _ = reply.send(remote.forward(output).await);
                });
            }
        }
        Ok(())
    }
}

/// A typed handle over a shard's mailbox: the entry of the chain from it onwards.
#[derive(Clone, Debug)]
pub struct ShardHandle {
    actor: ActorRef<ShardMsg>,
}

impl ShardHandle {
    pub async fn start(args: ShardArgs) -> Result<ShardHandle, ractor::SpawnErr> {
        let (actor, _) = Actor::spawn(None, Shard, args).await?;
        Ok(ShardHandle { actor })
    }

    /// Runs `input` through this stage and every later one.
    pub async fn forward(&self, input: Activation) -> Result<Activation, ShardError> {
        let (reply, answer) = oneshot::channel();
        self.actor
            .cast(ShardMsg::Forward {
                input,
                reply: reply.into(),
            })
            .map_err(|_| ShardError::Stopped)?;
        answer.await.map_err(|_| ShardError::Stopped)?
    }

    pub fn stop(&self) {
        self.actor.stop(None);
    }
}

/// A chain of shard actors in this process, first stage first.
pub struct Pipeline {
    shards: Vec<ShardHandle>,
}

impl Pipeline {
    /// Starts one shard per stage, chained in order; the last one answers, or hands on to
    /// `then` (a remote stage) when given.
    pub async fn start(
        stages: Vec<Arc<dyn Stage>>,
        then: Option<RemoteStage>,
        compute: &ComputePool,
    ) -> Result<Pipeline, ractor::SpawnErr> {
        let mut next = then.map_or(Next::Reply, Next::Remote);
        let mut shards = Vec::with_capacity(stages.len());
        for stage in stages.into_iter().rev() {
            let shard = ShardHandle::start(ShardArgs {
                stage,
                next,
                compute: compute.clone(),
            })
            .await?;
            next = Next::Local(shard.clone());
            shards.push(shard);
        }
        shards.reverse();
        Ok(Pipeline { shards })
    }

    pub async fn forward(&self, input: Activation) -> Result<Activation, ShardError> {
        match self.shards.first() {
            Some(first) => first.forward(input).await,
            None => Ok(input),
        }
    }

    /// The first shard, to serve this chain to other hosts.
    pub fn entry(&self) -> Option<&ShardHandle> {
        self.shards.first()
    }
}

impl Drop for Pipeline {
    fn drop(&mut self) {
        for shard in &self.shards {
            shard.stop();
        }
    }
}

async fn write_frame<T: Serialize>(stream: &mut TcpStream, value: &T) -> Result<(), ShardError> {
    let bytes = bincode::serde::encode_to_vec(value, bincode::config::standard())
        .map_err(|error| ShardError::Transport(format!("encode: {error}")))?;
    if bytes.len() > FRAME_BYTES_MAX {
        return Err(ShardError::Transport(format!(
            "frame of {} bytes is over {FRAME_BYTES_MAX}",
            bytes.len()
        )));
    }
    let length =
        u32::try_from(bytes.len()).map_err(|_| ShardError::Transport("frame length".into()))?;
    let io = |error: std::io::Error| ShardError::Transport(error.to_string());
    stream.write_all(&length.to_be_bytes()).await.map_err(io)?;
    stream.write_all(&bytes).await.map_err(io)?;
    stream.flush().await.map_err(io)
}

/// Reads one frame; `Ok(None)` when the peer closed the connection between frames.
async fn read_frame<T: for<'de> Deserialize<'de>>(
    stream: &mut TcpStream,
) -> Result<Option<T>, ShardError> {
    let io = |error: std::io::Error| ShardError::Transport(error.to_string());
    let mut length = [0u8; 4];
    match stream.read_exact(&mut length).await {
        Ok(_) => {}
        Err(error) if error.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(error) => return Err(io(error)),
    }
    let length = u32::from_be_bytes(length) as usize;
    if length > FRAME_BYTES_MAX {
        return Err(ShardError::Transport(format!(
            "frame of {length} bytes is over {FRAME_BYTES_MAX}"
        )));
    }
    let mut bytes = vec![0u8; length];
    stream.read_exact(&mut bytes).await.map_err(io)?;
    let (value, _) = bincode::serde::decode_from_slice(&bytes, bincode::config::standard())
        .map_err(|error| ShardError::Transport(format!("decode: {error}")))?;
    Ok(Some(value))
}

/// Serves the chain starting at `entry` to other hosts: each connection sends activation
/// frames and gets one result frame per request, in order. Runs until the listener fails.
pub async fn serve(listener: TcpListener, entry: ShardHandle) {
    loop {
        let (mut stream, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(error) => {
                tracing::warn!(%error, "data-plane listener failed");
                return;
            }
        };
        let _ = stream.set_nodelay(true);
        let entry = entry.clone();
        tokio::spawn(async move {
            loop {
                let input: Activation = match read_frame(&mut stream).await {
                    Ok(Some(input)) => input,
                    Ok(None) => return,
                    Err(error) => {
                        tracing::warn!(%peer, %error, "dropping data-plane connection");
                        return;
                    }
                };
                let result = entry.forward(input).await;
                if write_frame(&mut stream, &result).await.is_err() {
                    return;
                }
            }
        });
    }
}

struct RemoteCall {
    input: Activation,
    reply: oneshot::Sender<Result<Activation, ShardError>>,
}

/// A stage on another host. One connection, requests in order; reconnects after an error.
#[derive(Clone, Debug)]
pub struct RemoteStage {
    calls: mpsc::Sender<RemoteCall>,
}

impl RemoteStage {
    /// A client for the stage served at `address`; connects on first use.
    pub fn new(address: SocketAddr) -> RemoteStage {
        let (calls, queue) = mpsc::channel(REMOTE_QUEUE_CAPACITY);
        tokio::spawn(remote_client(address, queue));
        RemoteStage { calls }
    }

    pub async fn forward(&self, input: Activation) -> Result<Activation, ShardError> {
        let (reply, answer) = oneshot::channel();
        self.calls
            .try_send(RemoteCall { input, reply })
            .map_err(|error| match error {
                mpsc::error::TrySendError::Full(_) => ShardError::Overloaded,
                mpsc::error::TrySendError::Closed(_) => ShardError::Stopped,
            })?;
        answer.await.map_err(|_| ShardError::Stopped)?
    }
}

async fn remote_client(address: SocketAddr, mut queue: mpsc::Receiver<RemoteCall>) {
    let mut connection: Option<TcpStream> = None;
    while let Some(call) = queue.recv().await {
        let result = tokio::time::timeout(REMOTE_TIMEOUT, async {
            if connection.is_none() {
                let stream = TcpStream::connect(address).await.map_err(|error| {
                    ShardError::Transport(format!("connect {address}: {error}"))
                })?;
                let _ = stream.set_nodelay(true);
                connection = Some(stream);
            }
            let Some(stream) = connection.as_mut() else {
                return Err(ShardError::Stopped);
            };
            write_frame(stream, &call.input).await?;
            read_frame::<Result<Activation, ShardError>>(stream)
                .await?
                .ok_or_else(|| ShardError::Transport("the remote stage closed".into()))?
        })
        .await
        .unwrap_or_else(|_| Err(ShardError::Transport("timed out".into())));
        if matches!(result, Err(ShardError::Transport(_))) {
            // The stream may be mid-frame: start the next request on a fresh connection.
            connection = None;
        }
        let _ = call.reply.send(result);
    }
}

#[cfg(test)]
mod tests;
