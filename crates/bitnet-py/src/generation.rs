//! Results of a generation: the `Generation` object, and the `TextStream` iterator that
//! `stream=True` returns.

use std::ops::ControlFlow;
use std::sync::mpsc::{sync_channel, Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex, PoisonError};

use bitnet_inference::{GenerateOptions, Generation as EngineGeneration, InferenceError, StopReason};
use pyo3::prelude::*;

use crate::engine::Engine;
use crate::errors::{engine_error, inference_error};
use crate::worker::{self, StopFlag, SIGNAL_POLL};

/// Text pieces a stream may run ahead of its reader before the generation waits.
const STREAM_BUFFER: usize = 16;

/// The result of `Model.generate` or `Model.chat` (with `stream=False`, or a stream's `result`).
#[pyclass(frozen, module = "bitnet", name = "Generation", get_all)]
#[derive(Clone)]
pub struct PyGeneration {
    /// The generated text, cut before a stop string.
    pub text: String,
    /// The generated token ids (an end-of-sequence id that stopped generation included).
    pub token_ids: Vec<u32>,
    /// The prompt's token ids.
    pub prompt_token_ids: Vec<u32>,
    /// Why generation ended: "eos", "stop_string", "max_tokens", "context_full" or "cancelled".
    pub stop_reason: &'static str,
    /// Seconds spent on the prompt (prefill) and on the tokens after it (decode).
    pub prompt_seconds: f64,
    pub decode_seconds: f64,
    /// Prompt tokens per second, and generated tokens per second after the first.
    pub prompt_tokens_per_s: f64,
    pub decode_tokens_per_s: f64,
}

pub fn stop_reason_name(r: StopReason) -> &'static str {
    match r {
        StopReason::Eos => "eos",
        StopReason::StopString => "stop_string",
        StopReason::MaxTokens => "max_tokens",
        StopReason::ContextFull => "context_full",
        StopReason::Cancelled => "cancelled",
    }
}

impl From<EngineGeneration> for PyGeneration {
    fn from(g: EngineGeneration) -> Self {
        Self {
            prompt_tokens_per_s: g.prompt_tokens_per_s(),
            decode_tokens_per_s: g.decode_tokens_per_s(),
            prompt_seconds: g.prompt_time.as_secs_f64(),
            decode_seconds: g.decode_time.as_secs_f64(),
            stop_reason: stop_reason_name(g.stop_reason),
            text: g.text,
            token_ids: g.generated,
            prompt_token_ids: g.prompt_ids,
        }
    }
}

#[pymethods]
impl PyGeneration {
    fn __repr__(&self) -> String {
        format!(
            "Generation(text={:?}, token_ids=<{} ids>, stop_reason={:?})",
            self.text,
            self.token_ids.len(),
            self.stop_reason
        )
    }

    fn __str__(&self) -> String {
        self.text.clone()
    }
}

/// A request ready to run: prompt ids, options, and the tokenizer to decode with.
pub struct Request {
    pub engine: Arc<Engine>,
    pub ids: Vec<u32>,
    pub opts: GenerateOptions,
}

impl Request {
    fn run(
        &self,
        on_text: impl FnMut(&str) -> ControlFlow<()> + Send,
    ) -> Result<EngineGeneration, InferenceError> {
        let tokenizer = self.engine.tokenizer.clone().expect("checked when the request was made");
        self.engine.generate(&tokenizer, &self.ids, &self.opts, on_text)
    }

    /// Generates on a worker thread while this thread waits, detached, for the result.
    pub fn run_to_end(self, py: Python<'_>) -> PyResult<PyGeneration> {
        let out = worker::run_interruptible(py, "generate", move |stop| {
            self.run(|_| if stop.is_raised() { ControlFlow::Break(()) } else { ControlFlow::Continue(()) })
        })?;
        out.map(PyGeneration::from).map_err(inference_error)
    }

    /// Starts generating on a worker thread; the stream reads its text.
    pub fn start_stream(self) -> PyResult<TextStream> {
        let (tx, rx) = sync_channel(STREAM_BUFFER);
        let stop = StopFlag::default();
        let worker_stop = stop.clone();
        worker::spawn("stream", move || {
            let pieces = tx.clone();
            let out = self.run(|piece| {
                // A closed or dropped stream has dropped its receiver: the send fails.
                if worker_stop.is_raised() || pieces.send(Event::Text(piece.to_owned())).is_err() {
                    ControlFlow::Break(())
                } else {
                    ControlFlow::Continue(())
                }
            });
            let _ = tx.send(Event::Done(out));
        })?;
        Ok(TextStream { state: Mutex::new(StreamState { rx: Some(rx), result: None }), stop })
    }
}

enum Event {
    Text(String),
    Done(Result<EngineGeneration, InferenceError>),
}

struct StreamState {
    /// `None` once the generation has ended.
    rx: Option<Receiver<Event>>,
    result: Option<PyGeneration>,
}

/// What one wait on a stream brought.
enum Poll {
    Text(String),
    Finished,
    Failed(InferenceError),
    Waiting,
    Lost,
}

/// An iterator over the text of a generation, piece by piece as the tokens complete
/// (`Model.generate(..., stream=True)`). The pieces join to the text of the same generation
/// with `stream=False`. After the last piece, `result` holds the `Generation`.
///
/// The generation runs on a thread of its own and stops when the stream is closed (`close()`,
/// the end of a `with` block) or garbage-collected, or on Ctrl-C while it is being read.
#[pyclass(frozen, module = "bitnet", name = "TextStream")]
pub struct TextStream {
    state: Mutex<StreamState>,
    stop: StopFlag,
}

impl TextStream {
    /// Waits up to one poll interval for the next event (call detached from Python).
    fn poll(&self) -> Poll {
        let mut st = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        let Some(rx) = &st.rx else { return Poll::Finished };
        match rx.recv_timeout(SIGNAL_POLL) {
            Ok(Event::Text(piece)) => Poll::Text(piece),
            Ok(Event::Done(Ok(g))) => {
                st.rx = None;
                st.result = Some(g.into());
                Poll::Finished
            }
            Ok(Event::Done(Err(e))) => {
                st.rx = None;
                Poll::Failed(e)
            }
            Err(RecvTimeoutError::Timeout) => Poll::Waiting,
            Err(RecvTimeoutError::Disconnected) => {
                st.rx = None;
                Poll::Lost
            }
        }
    }
}

impl Drop for TextStream {
    fn drop(&mut self) {
        self.stop.raise();
    }
}

#[pymethods]
impl TextStream {
    fn __iter__(slf: Py<Self>) -> Py<Self> {
        slf
    }

    fn __next__(&self, py: Python<'_>) -> PyResult<Option<String>> {
        loop {
            match py.detach(|| self.poll()) {
                Poll::Text(piece) => return Ok(Some(piece)),
                Poll::Finished => return Ok(None),
                Poll::Failed(e) => return Err(inference_error(e)),
                Poll::Lost => return Err(engine_error("the generation thread ended without a result")),
                Poll::Waiting => {
                    if let Err(e) = py.check_signals() {
                        self.stop.raise();
                        return Err(e);
                    }
                }
            }
        }
    }

    /// Stops the generation (if it is still running) and waits for it to end; `result` then
    /// holds what was generated, with `stop_reason` "cancelled" if it was cut short.
    fn close(&self, py: Python<'_>) -> PyResult<()> {
        self.stop.raise();
        loop {
            match py.detach(|| self.poll()) {
                Poll::Text(_) | Poll::Waiting => continue,
                Poll::Finished => return Ok(()),
                Poll::Failed(e) => return Err(inference_error(e)),
                Poll::Lost => return Err(engine_error("the generation thread ended without a result")),
            }
        }
    }

    /// The `Generation` once the stream is exhausted or closed; `None` before.
    #[getter]
    fn result(&self) -> Option<PyGeneration> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner).result.clone()
    }

    fn __enter__(slf: Py<Self>) -> Py<Self> {
        slf
    }

    #[pyo3(signature = (*_exc))]
    fn __exit__(&self, py: Python<'_>, _exc: &Bound<'_, pyo3::types::PyTuple>) -> PyResult<bool> {
        self.close(py)?;
        Ok(false)
    }
}
