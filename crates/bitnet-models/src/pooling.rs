//! How an embedding model turns its hidden states into one vector, as its checkpoint declares it:
//! sentence-transformers' `modules.json` and `1_Pooling/config.json` in a folder, or
//! `{arch}.pooling_type` in a GGUF file.

use std::path::Path;

use serde_json::Value;

use crate::gguf::GgufFile;
use crate::ModelError;

/// A pooling of the final hidden states.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Pooling {
    /// The last token's state (BitNet-embedding, Qwen3-Embedding: the tokenizer appends the
    /// end-of-text token that is pooled).
    LastToken,
    /// The mean over the tokens.
    Mean,
    /// The first token's state.
    Cls,
    /// Anything else, by the name the checkpoint gives it.
    Other(String),
}

impl std::fmt::Display for Pooling {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Pooling::LastToken => write!(f, "last-token"),
            Pooling::Mean => write!(f, "mean"),
            Pooling::Cls => write!(f, "CLS"),
            Pooling::Other(name) => write!(f, "{name}"),
        }
    }
}

/// The pooling `path` (a checkpoint folder or a `.gguf` file) declares, or `None` when it says
/// nothing.
pub fn declared_pooling(path: &Path) -> Result<Option<Pooling>, ModelError> {
    if path.is_file() {
        return Ok(gguf_pooling(&GgufFile::open(path)?));
    }
    let Some(config) = pooling_config_path(path)? else { return Ok(None) };
    let json = read_json(&config)?;
    let on = |key: &str| json.get(key).and_then(Value::as_bool).unwrap_or(false);
    let modes = [
        ("pooling_mode_lasttoken", Pooling::LastToken),
        ("pooling_mode_mean_tokens", Pooling::Mean),
        ("pooling_mode_cls_token", Pooling::Cls),
    ];
    let named =
        ["pooling_mode_max_tokens", "pooling_mode_mean_sqrt_len_tokens", "pooling_mode_weightedmean_tokens"];
    match modes.into_iter().find(|(key, _)| on(key)) {
        Some((_, p)) => Ok(Some(p)),
        None => Ok(named.iter().find(|k| on(k)).map(|k| Pooling::Other(k.to_string()))),
    }
}

/// `{arch}.pooling_type` of a GGUF file (llama.cpp's enum: 1 mean, 2 CLS, 3 last).
pub fn gguf_pooling(file: &GgufFile) -> Option<Pooling> {
    let md = file.metadata();
    let arch = md.get_str("general.architecture")?;
    Some(match md.get_u64(&format!("{arch}.pooling_type"))? {
        1 => Pooling::Mean,
        2 => Pooling::Cls,
        3 => Pooling::LastToken,
        other => Pooling::Other(format!("pooling_type {other}")),
    })
}

/// The pooling module's config.json: the folder `modules.json` names for its Pooling module, or
/// `1_Pooling/` when there is no `modules.json`.
fn pooling_config_path(dir: &Path) -> Result<Option<std::path::PathBuf>, ModelError> {
    let modules = dir.join("modules.json");
    if !modules.exists() {
        let default = dir.join("1_Pooling/config.json");
        return Ok(default.exists().then_some(default));
    }
    let json = read_json(&modules)?;
    let Some(list) = json.as_array() else {
        return Err(ModelError::config(&modules, "is not a list of modules"));
    };
    let pooling =
        list.iter().find(|m| m.get("type").and_then(Value::as_str).is_some_and(|t| t.ends_with("Pooling")));
    Ok(pooling.and_then(|m| m.get("path").and_then(Value::as_str)).map(|p| dir.join(p).join("config.json")))
}

fn read_json(path: &Path) -> Result<Value, ModelError> {
    let text = std::fs::read_to_string(path).map_err(|e| ModelError::io(path, e))?;
    serde_json::from_str(&text).map_err(|e| ModelError::config(path, format!("not valid JSON: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir_with(files: &[(&str, &str)]) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        for (name, text) in files {
            let p = dir.path().join(name);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(p, text).unwrap();
        }
        dir
    }

    #[test]
    fn sentence_transformers_modules_name_the_pooling() {
        let modules = r#"[{"idx":0,"name":"0","path":"","type":"sentence_transformers.models.Transformer"},
                         {"idx":1,"name":"1","path":"1_Pooling","type":"sentence_transformers.models.Pooling"}]"#;
        let last = dir_with(&[
            ("modules.json", modules),
            ("1_Pooling/config.json", r#"{"pooling_mode_lasttoken": true}"#),
        ]);
        assert_eq!(declared_pooling(last.path()).unwrap(), Some(Pooling::LastToken));
        let mean = dir_with(&[(
            "1_Pooling/config.json",
            r#"{"pooling_mode_mean_tokens": true, "pooling_mode_lasttoken": false}"#,
        )]);
        assert_eq!(declared_pooling(mean.path()).unwrap(), Some(Pooling::Mean));
        let max = dir_with(&[("1_Pooling/config.json", r#"{"pooling_mode_max_tokens": true}"#)]);
        assert_eq!(
            declared_pooling(max.path()).unwrap(),
            Some(Pooling::Other("pooling_mode_max_tokens".into()))
        );
        assert_eq!(declared_pooling(dir_with(&[]).path()).unwrap(), None);
        let bad = dir_with(&[("modules.json", "{}")]);
        assert!(declared_pooling(bad.path()).unwrap_err().to_string().contains("modules.json"));
    }
}
