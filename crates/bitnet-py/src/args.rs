//! Python arguments turned into the engine's types, with a `ValueError` (or `TypeError`) that
//! names the argument when one is wrong.

use bitnet_inference::SamplingParams;
use bitnet_models::chat::ChatMessage;
use pyo3::exceptions::PyTypeError;
use pyo3::prelude::*;
use pyo3::types::PyString;

use crate::errors::value_error;

/// A count that must not be negative (`max_tokens`, `top_k`, `steps`...).
pub fn count(name: &str, value: i64) -> PyResult<usize> {
    usize::try_from(value).map_err(|_| value_error(format!("{name} must be >= 0, got {value}")))
}

/// A count that must be at least one (`threads`...).
pub fn positive(name: &str, value: i64) -> PyResult<usize> {
    match usize::try_from(value) {
        Ok(n) if n > 0 => Ok(n),
        _ => Err(value_error(format!("{name} must be >= 1, got {value}"))),
    }
}

/// Token ids from any iterable of integers (a list, a tuple, a numpy array), each one checked to
/// fit a `u32`; `name` is the argument's name in errors.
pub fn token_ids(name: &str, obj: &Bound<'_, PyAny>) -> PyResult<Vec<u32>> {
    if obj.is_instance_of::<PyString>() {
        return Err(PyTypeError::new_err(format!("{name} must be a sequence of token ids, not a str")));
    }
    let items = obj
        .try_iter()
        .map_err(|_| PyTypeError::new_err(format!("{name} must be a sequence of token ids (ints)")))?;
    let mut ids = Vec::new();
    for (at, item) in items.enumerate() {
        let item = item?;
        let id: i64 = item.extract().map_err(|_| {
            PyTypeError::new_err(format!("{name}[{at}] must be an int, got {}", type_name(&item)))
        })?;
        let id = u32::try_from(id)
            .map_err(|_| value_error(format!("{name}[{at}] = {id} is not a token id (ids are 0 or more)")))?;
        ids.push(id);
    }
    Ok(ids)
}

fn type_name(obj: &Bound<'_, PyAny>) -> String {
    obj.get_type().name().map(|n| n.to_string()).unwrap_or_else(|_| "an object".into())
}

/// `stop`: `None`, one string, or a sequence of strings.
pub fn stop_strings(obj: Option<&Bound<'_, PyAny>>) -> PyResult<Vec<String>> {
    let Some(obj) = obj else { return Ok(Vec::new()) };
    if let Ok(one) = obj.cast::<PyString>() {
        return Ok(vec![one.to_cow()?.into_owned()]);
    }
    let items =
        obj.try_iter().map_err(|_| PyTypeError::new_err("stop must be a str or a sequence of str"))?;
    items
        .enumerate()
        .map(|(at, item)| {
            let item = item?;
            item.extract::<String>().map_err(|_| {
                PyTypeError::new_err(format!("stop[{at}] must be a str, got {}", type_name(&item)))
            })
        })
        .collect()
}

/// Sampling settings, checked against their ranges (`ValueError` naming the parameter).
pub struct Sampling {
    pub temperature: f64,
    pub top_k: i64,
    pub top_p: f64,
    pub min_p: f64,
    pub repeat_penalty: f64,
    pub seed: i128,
}

impl Sampling {
    pub fn params(&self) -> PyResult<SamplingParams> {
        let seed = u64::try_from(self.seed)
            .map_err(|_| value_error(format!("seed must be in 0..2**64, got {}", self.seed)))?;
        let params = SamplingParams {
            temperature: self.temperature as f32,
            top_k: count("top_k", self.top_k)?,
            top_p: self.top_p as f32,
            min_p: self.min_p as f32,
            repeat_penalty: self.repeat_penalty as f32,
            seed,
            ..SamplingParams::default()
        };
        params.validate().map_err(|e| value_error(e.to_string()))?;
        Ok(params)
    }
}

/// `messages`: a sequence of `{"role": str, "content": str}` mappings.
pub fn messages(obj: &Bound<'_, PyAny>) -> PyResult<Vec<ChatMessage>> {
    if obj.is_instance_of::<PyString>() {
        return Err(PyTypeError::new_err(
            "messages must be a list of {\"role\": ..., \"content\": ...} dicts, not a str",
        ));
    }
    let items = obj.try_iter().map_err(|_| {
        PyTypeError::new_err("messages must be a list of {\"role\": ..., \"content\": ...} dicts")
    })?;
    let mut out = Vec::new();
    for (at, item) in items.enumerate() {
        let item = item?;
        if item.is_instance_of::<PyString>() || !item.hasattr("keys")? {
            return Err(value_error(format!(
                "message {at} must be a dict with 'role' and 'content', got {}",
                type_name(&item)
            )));
        }
        let field = |key: &str| -> PyResult<String> {
            let value =
                item.get_item(key).map_err(|_| value_error(format!("message {at}: '{key}' is missing")))?;
            value.extract::<String>().map_err(|_| {
                value_error(format!("message {at}: '{key}' must be a str, got {}", type_name(&value)))
            })
        };
        out.push(ChatMessage { role: field("role")?, content: field("content")? });
    }
    Ok(out)
}
