//! `bitnet pull` against an imitation of the Hugging Face Hub on loopback (issue 18, item 12):
//! the endpoints and headers hf-hub 0.4 uses — the repository listing
//! (`/api/models/ORG/NAME/revision/REV?blobs=true`) and the file route
//! (`/ORG/NAME/resolve/REV/FILE`, with `x-repo-commit`, `etag`/`x-linked-etag`,
//! `x-linked-size`, `Content-Range` and Range requests) — serving the tiny fixture checkpoint,
//! with the faults a network has: a damaged body, a missing repository, a connection that drops
//! half way.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::{Arc, Mutex};

use sha1::Sha1;
use sha2::{Digest, Sha256};

const REPO: &str = "test-org/tiny-bitnet";
const COMMIT: &str = "0123456789abcdef0123456789abcdef01234567";

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn sha256(data: &[u8]) -> String {
    hex(&Sha256::digest(data))
}

/// git's blob id: what the Hub calls `blobId` and sends as the etag of a non-LFS file.
fn git_blob_id(data: &[u8]) -> String {
    let mut h = Sha1::new();
    h.update(format!("blob {}\0", data.len()).as_bytes());
    h.update(data);
    hex(&h.finalize())
}

struct HubFile {
    name: String,
    bytes: Vec<u8>,
    /// Stored with git LFS: hashed by SHA-256 (`x-linked-etag`), otherwise by git blob id.
    lfs: bool,
}

impl HubFile {
    fn etag(&self) -> String {
        if self.lfs {
            sha256(&self.bytes)
        } else {
            git_blob_id(&self.bytes)
        }
    }
}

/// What the imitation serves and how it misbehaves; shared with its thread.
#[derive(Default)]
struct HubState {
    files: Vec<HubFile>,
    /// Files served with one byte changed (the listing keeps the true hash).
    corrupt: Vec<String>,
    /// File → (offset where the connection drops, how many more times to drop it).
    cut: HashMap<String, (usize, usize)>,
    /// `GET path range` of every request, in order.
    log: Vec<String>,
    /// A gated repository: every request must carry `Authorization: Bearer TOKEN`.
    token: Option<String>,
}

struct FakeHub {
    endpoint: String,
    state: Arc<Mutex<HubState>>,
}

impl FakeHub {
    fn start(files: Vec<HubFile>) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").expect("a loopback port");
        let endpoint = format!("http://{}", listener.local_addr().unwrap());
        let state = Arc::new(Mutex::new(HubState { files, ..HubState::default() }));
        let shared = Arc::clone(&state);
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let shared = Arc::clone(&shared);
                std::thread::spawn(move || serve_one(stream, &shared));
            }
        });
        Self { endpoint, state }
    }

    fn log(&self) -> Vec<String> {
        self.state.lock().unwrap().log.clone()
    }

    fn clear_log(&self) {
        self.state.lock().unwrap().log.clear();
    }
}

/// Answers one request and closes the connection.
fn serve_one(mut stream: TcpStream, state: &Mutex<HubState>) {
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut request_line = String::new();
    if reader.read_line(&mut request_line).is_err() {
        return;
    }
    let mut headers = HashMap::new();
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).unwrap_or(0) == 0 || line.trim().is_empty() {
            break;
        }
        if let Some((k, v)) = line.split_once(':') {
            headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_owned());
        }
    }
    let target = request_line.split_whitespace().nth(1).unwrap_or("/").to_owned();
    let (path, query) = target.split_once('?').unwrap_or((&target, ""));
    let range = headers.get("range").cloned().unwrap_or_default();
    let mut st = state.lock().unwrap();
    st.log.push(format!("GET {path} {range}"));
    let authorized =
        st.token.as_ref().is_none_or(|t| headers.get("authorization") == Some(&format!("Bearer {t}")));
    let reply = if !authorized {
        Reply { status: "401 Unauthorized", ..Reply::not_found("GatedRepo") }
    } else if let Some(rest) = path.strip_prefix("/api/models/") {
        listing(&st, rest, query.contains("blobs=true"))
    } else {
        resolve(&mut st, path, &range)
    };
    drop(st);
    let _ = reply.send(&mut stream);
}

struct Reply {
    status: &'static str,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
    /// Bytes of the body actually sent before the connection drops (all when `None`).
    cut_after: Option<usize>,
}

impl Reply {
    fn not_found(code: &str) -> Self {
        Reply {
            status: "404 Not Found",
            headers: vec![("x-error-code".into(), code.into())],
            body: format!("{{\"error\":\"{code}\"}}").into_bytes(),
            cut_after: None,
        }
    }

    fn send(&self, stream: &mut TcpStream) -> std::io::Result<()> {
        let mut head = format!(
            "HTTP/1.1 {}\r\nContent-Length: {}\r\nConnection: close\r\n",
            self.status,
            self.body.len()
        );
        for (k, v) in &self.headers {
            head.push_str(&format!("{k}: {v}\r\n"));
        }
        head.push_str("\r\n");
        stream.write_all(head.as_bytes())?;
        let n = self.cut_after.unwrap_or(self.body.len()).min(self.body.len());
        stream.write_all(&self.body[..n])?;
        stream.flush()?;
        stream.shutdown(std::net::Shutdown::Both)
    }
}

/// `/api/models/ORG/NAME/revision/REV`: the commit and the files (sizes and hashes with
/// `blobs=true`, as the Hub).
fn listing(st: &HubState, rest: &str, blobs: bool) -> Reply {
    let Some((repo, rev)) = rest.split_once("/revision/") else { return Reply::not_found("RepoNotFound") };
    if repo != REPO {
        return Reply::not_found("RepoNotFound");
    }
    if rev != "main" && rev != COMMIT {
        return Reply::not_found("RevisionNotFound");
    }
    let siblings: Vec<serde_json::Value> = st
        .files
        .iter()
        .map(|f| {
            let mut s = serde_json::json!({ "rfilename": f.name });
            if blobs {
                s["size"] = f.bytes.len().into();
                s["blobId"] = git_blob_id(&f.bytes).into();
                if f.lfs {
                    s["lfs"] = serde_json::json!({
                        "sha256": sha256(&f.bytes), "size": f.bytes.len(), "pointerSize": 134
                    });
                }
            }
            s
        })
        .collect();
    let body = serde_json::json!({ "id": REPO, "sha": COMMIT, "siblings": siblings });
    Reply {
        status: "200 OK",
        headers: vec![("Content-Type".into(), "application/json".into())],
        body: body.to_string().into_bytes(),
        cut_after: None,
    }
}

/// `/ORG/NAME/resolve/REV/FILE`, with Range requests as the Hub's file servers answer them.
fn resolve(st: &mut HubState, path: &str, range: &str) -> Reply {
    let Some(rest) = path.strip_prefix(&format!("/{REPO}/resolve/")) else {
        return Reply::not_found("RepoNotFound");
    };
    let Some((rev, name)) = rest.split_once('/') else { return Reply::not_found("EntryNotFound") };
    if rev != "main" && rev != COMMIT {
        return Reply::not_found("RevisionNotFound");
    }
    let Some(file) = st.files.iter().find(|f| f.name == name) else {
        return Reply::not_found("EntryNotFound");
    };
    let mut bytes = file.bytes.clone();
    if st.corrupt.iter().any(|c| c == name) {
        let mid = bytes.len() / 2;
        bytes[mid] ^= 0x5a;
    }
    let total = bytes.len();
    let etag = format!("\"{}\"", file.etag());
    let mut headers = vec![
        ("x-repo-commit".to_owned(), COMMIT.to_owned()),
        ("accept-ranges".to_owned(), "bytes".to_owned()),
        ("etag".to_owned(), etag.clone()),
    ];
    if file.lfs {
        headers.push(("x-linked-etag".to_owned(), etag));
        headers.push(("x-linked-size".to_owned(), total.to_string()));
    }
    let (start, end) = match range.strip_prefix("bytes=").and_then(|r| r.split_once('-')) {
        Some((a, b)) => {
            let a: usize = a.parse().unwrap_or(0);
            let b: usize =
                if b.is_empty() { total.saturating_sub(1) } else { b.parse().unwrap_or(total - 1) };
            (a, b.min(total.saturating_sub(1)))
        }
        None => (0, total.saturating_sub(1)),
    };
    if start >= total {
        headers.push(("Content-Range".to_owned(), format!("bytes */{total}")));
        return Reply { status: "416 Range Not Satisfiable", headers, body: Vec::new(), cut_after: None };
    }
    let mut cut_after = None;
    if end > start {
        // A body transfer (not hf-hub's one-byte metadata probe): drop it half way if asked.
        if let Some((at, times)) = st.cut.get_mut(name) {
            if *times > 0 && *at > start {
                *times -= 1;
                cut_after = Some(*at - start);
            }
        }
    }
    let status = if range.is_empty() {
        "200 OK"
    } else {
        headers.push(("Content-Range".to_owned(), format!("bytes {start}-{end}/{total}")));
        "206 Partial Content"
    };
    Reply { status, headers, body: bytes[start..=end].to_vec(), cut_after }
}

fn fixture_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/hf-bitnet-tiny/packed")
}

/// The fixture checkpoint as a Hub repository: git files, LFS files and files a pull skips.
fn checkpoint_files() -> Vec<HubFile> {
    let file = |name: &str, lfs: bool| HubFile {
        name: name.to_owned(),
        bytes: std::fs::read(fixture_dir().join(name)).unwrap(),
        lfs,
    };
    vec![
        HubFile { name: ".gitattributes".into(), bytes: b"*.safetensors filter=lfs\n".to_vec(), lfs: false },
        HubFile { name: "README.md".into(), bytes: b"# tiny\n".to_vec(), lfs: false },
        file("config.json", false),
        file("generation_config.json", false),
        file("tokenizer.json", true),
        file("model.safetensors", true),
    ]
}

struct Env {
    _tmp: tempfile::TempDir,
    hf_home: PathBuf,
}

impl Env {
    fn new() -> Self {
        let tmp = tempfile::tempdir().unwrap();
        let hf_home = tmp.path().join("hf");
        Self { _tmp: tmp, hf_home }
    }

    fn repo_dir(&self) -> PathBuf {
        self.hf_home.join("hub").join("models--test-org--tiny-bitnet")
    }

    fn snapshot(&self) -> PathBuf {
        self.repo_dir().join("snapshots").join(COMMIT)
    }

    /// `bitnet args…` with the Hub at `endpoint` and the cache in this environment only.
    fn bitnet(&self, endpoint: &str, args: &[&str]) -> Output {
        self.bitnet_with(endpoint, &[], args)
    }

    /// [`Env::bitnet`] with more environment variables.
    fn bitnet_with(&self, endpoint: &str, vars: &[(&str, &Path)], args: &[&str]) -> Output {
        let mut c = Command::new(env!("CARGO_BIN_EXE_bitnet"));
        for var in [
            "HF_TOKEN",
            "HF_TOKEN_PATH",
            "HF_HUB_CACHE",
            "HTTP_PROXY",
            "HTTPS_PROXY",
            "ALL_PROXY",
            "http_proxy",
            "https_proxy",
            "all_proxy",
        ] {
            c.env_remove(var);
        }
        c.env("HF_ENDPOINT", endpoint).env("HF_HOME", &self.hf_home).env("BITNET_CACHE_DIR", "off");
        c.envs(vars.iter().copied());
        c.args(args).output().expect("the bitnet binary runs")
    }
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn succeeds(out: &Output, what: &str) -> String {
    assert!(out.status.success(), "{what} failed: {}", text(&out.stderr));
    text(&out.stdout)
}

fn fails(out: &Output, what: &str, needles: &[&str]) -> String {
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{what} should exit 1; stderr: {err}");
    assert!(!err.contains("panicked"), "{what} panicked: {err}");
    for n in needles {
        assert!(err.contains(n), "{what}: stderr lacks {n:?}: {err}");
    }
    err
}

/// Greedy text of a model folder or file, as `generate` prints it.
fn greedy(env: &Env, endpoint: &str, model: &str) -> String {
    let out = env.bitnet(
        endpoint,
        &["generate", "--model", model, "--prompt", "Hello", "--max-tokens", "6", "--temperature", "0"],
    );
    succeeds(&out, &format!("generate --model {model}"))
}

fn resolves(log: &[String]) -> Vec<&String> {
    log.iter().filter(|l| l.contains("/resolve/")).collect()
}

#[test]
fn pull_fetches_a_checkpoint_that_then_generates() {
    let hub = FakeHub::start(checkpoint_files());
    let env = Env::new();
    let out = env.bitnet(&hub.endpoint, &["pull", REPO]);
    let printed = succeeds(&out, "pull");
    let path = PathBuf::from(printed.trim());
    assert_eq!(path, env.snapshot(), "stdout is the snapshot folder, alone");
    for name in ["config.json", "generation_config.json", "tokenizer.json", "model.safetensors"] {
        let got = std::fs::read(path.join(name)).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(got, std::fs::read(fixture_dir().join(name)).unwrap(), "{name}");
    }
    for skipped in ["README.md", ".gitattributes"] {
        assert!(!path.join(skipped).exists(), "{skipped} is not part of a checkpoint");
    }
    // The Hub cache layout: refs/main names the commit, snapshot entries link to blobs named
    // by their hash.
    assert_eq!(std::fs::read_to_string(env.repo_dir().join("refs/main")).unwrap(), COMMIT);
    let model = std::fs::read(fixture_dir().join("model.safetensors")).unwrap();
    let blob = env.repo_dir().join("blobs").join(sha256(&model));
    assert_eq!(
        std::fs::canonicalize(path.join("model.safetensors")).unwrap(),
        std::fs::canonicalize(blob).unwrap()
    );

    // The pulled folder runs as the fixture itself does.
    let from_fixture = greedy(&env, &hub.endpoint, fixture_dir().to_str().unwrap());
    assert_eq!(greedy(&env, &hub.endpoint, path.to_str().unwrap()), from_fixture);

    // `--model ORG/NAME` finds the pulled snapshot without the network; an id not pulled says how.
    assert_eq!(greedy(&env, "http://127.0.0.1:9", REPO), from_fixture);
    fails(
        &env.bitnet(&hub.endpoint, &["inspect", "test-org/not-pulled"]),
        "inspect ORG/NAME",
        &["bitnet pull test-org/not-pulled"],
    );

    // Pulling again checks the files and downloads nothing.
    hub.clear_log();
    let again = env.bitnet(&hub.endpoint, &["pull", REPO]);
    assert_eq!(succeeds(&again, "second pull"), printed);
    assert!(resolves(&hub.log()).is_empty(), "second pull downloaded: {:?}", hub.log());
    assert!(text(&again.stderr).contains("already downloaded"), "{}", text(&again.stderr));
}

#[test]
fn a_sharded_checkpoint_is_fetched_through_its_index() {
    let mut files: Vec<HubFile> =
        checkpoint_files().into_iter().filter(|f| f.name != "model.safetensors").collect();
    let shard = "model-00001-of-00001.safetensors";
    let weights = std::fs::read(fixture_dir().join("model.safetensors")).unwrap();
    let header_len = u64::from_le_bytes(weights[..8].try_into().unwrap()) as usize;
    let header: serde_json::Value = serde_json::from_slice(&weights[8..8 + header_len]).unwrap();
    let weight_map: serde_json::Map<String, serde_json::Value> = header
        .as_object()
        .unwrap()
        .keys()
        .filter(|k| *k != "__metadata__")
        .map(|k| (k.clone(), shard.into()))
        .collect();
    let index = serde_json::json!({ "metadata": {}, "weight_map": weight_map });
    files.push(HubFile {
        name: "model.safetensors.index.json".into(),
        bytes: index.to_string().into_bytes(),
        lfs: false,
    });
    files.push(HubFile { name: shard.into(), bytes: weights, lfs: true });
    files.push(HubFile { name: "unrelated.safetensors".into(), bytes: vec![0; 10], lfs: true });
    let hub = FakeHub::start(files);
    let env = Env::new();
    let path = PathBuf::from(succeeds(&env.bitnet(&hub.endpoint, &["pull", REPO, "-q"]), "pull").trim());
    assert!(path.join(shard).is_file() && path.join("model.safetensors.index.json").is_file());
    assert!(!path.join("unrelated.safetensors").exists(), "only the shards the index names");
    let from_fixture = greedy(&env, &hub.endpoint, fixture_dir().to_str().unwrap());
    assert_eq!(greedy(&env, &hub.endpoint, path.to_str().unwrap()), from_fixture);
}

#[test]
fn a_gguf_is_chosen_by_name_when_there_are_several() {
    let env = Env::new();
    let gguf = env.hf_home.parent().unwrap().join("tiny.gguf");
    let out = env.bitnet(
        "http://127.0.0.1:9",
        &[
            "convert",
            "--model",
            fixture_dir().to_str().unwrap(),
            "--out",
            gguf.to_str().unwrap(),
            "--type",
            "i2_s",
        ],
    );
    succeeds(&out, "convert");
    let bytes = std::fs::read(&gguf).unwrap();
    let files = vec![
        HubFile { name: "README.md".into(), bytes: b"# ggufs\n".to_vec(), lfs: false },
        HubFile { name: "tiny-i2_s.gguf".into(), bytes: bytes.clone(), lfs: true },
        HubFile { name: "tiny-copy.gguf".into(), bytes, lfs: true },
    ];
    let hub = FakeHub::start(files);
    fails(
        &env.bitnet(&hub.endpoint, &["pull", REPO]),
        "pull of a repository with two ggufs",
        &["several .gguf", "--file", "tiny-i2_s.gguf", "tiny-copy.gguf"],
    );
    fails(
        &env.bitnet(&hub.endpoint, &["pull", REPO, "--file", "nope.gguf"]),
        "pull --file nope",
        &["no file `nope.gguf`"],
    );
    let out = env.bitnet(&hub.endpoint, &["pull", REPO, "--file", "tiny-i2_s.gguf", "--include", "*.md"]);
    let path = PathBuf::from(succeeds(&out, "pull --file").trim());
    assert_eq!(path, env.snapshot().join("tiny-i2_s.gguf"), "stdout is the .gguf itself");
    assert!(env.snapshot().join("README.md").is_file(), "--include adds matches");
    assert!(!env.snapshot().join("tiny-copy.gguf").exists());
    assert_eq!(
        greedy(&env, &hub.endpoint, path.to_str().unwrap()),
        greedy(&env, &hub.endpoint, gguf.to_str().unwrap())
    );
}

#[test]
fn a_damaged_download_is_an_error_and_leaves_no_complete_file() {
    let hub = FakeHub::start(checkpoint_files());
    hub.state.lock().unwrap().corrupt = vec!["model.safetensors".into()];
    let env = Env::new();
    let err = fails(
        &env.bitnet(&hub.endpoint, &["pull", REPO]),
        "pull of a damaged file",
        &["model.safetensors", "SHA-256", "damaged", "removed"],
    );
    assert!(!err.contains("already downloaded"));
    let entry = env.snapshot().join("model.safetensors");
    assert!(entry.symlink_metadata().is_err(), "no snapshot entry for the damaged file");
    let model = std::fs::read(fixture_dir().join("model.safetensors")).unwrap();
    let blobs: Vec<PathBuf> = std::fs::read_dir(env.repo_dir().join("blobs"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_none_or(|e| e != "lock"))
        .collect();
    assert!(
        blobs.iter().all(|b| std::fs::metadata(b).unwrap().len() != model.len() as u64),
        "a blob of the damaged file's size is left: {blobs:?}"
    );

    // A damaged git-stored file fails its git blob id.
    let hub2 = FakeHub::start(checkpoint_files());
    hub2.state.lock().unwrap().corrupt = vec!["config.json".into()];
    let env2 = Env::new();
    fails(
        &env2.bitnet(&hub2.endpoint, &["pull", REPO]),
        "pull of a damaged config",
        &["config.json", "git blob SHA-1"],
    );
    assert!(env2.snapshot().join("config.json").symlink_metadata().is_err());

    // Once the server is right again, the same command completes.
    hub.state.lock().unwrap().corrupt.clear();
    let path =
        PathBuf::from(succeeds(&env.bitnet(&hub.endpoint, &["pull", REPO]), "pull after the fix").trim());
    assert_eq!(std::fs::read(path.join("model.safetensors")).unwrap(), model);
}

#[test]
fn a_missing_repository_revision_or_server_is_a_clear_error() {
    let hub = FakeHub::start(checkpoint_files());
    let env = Env::new();
    fails(
        &env.bitnet(&hub.endpoint, &["pull", "test-org/no-such-model"]),
        "pull of a missing repository",
        &["test-org/no-such-model", "not found", "HF_TOKEN"],
    );
    fails(
        &env.bitnet(&hub.endpoint, &["pull", REPO, "--revision", "v9"]),
        "pull of a missing revision",
        &["revision v9", "no such revision"],
    );
    fails(
        &env.bitnet(&hub.endpoint, &["pull", "not a repo"]),
        "pull of a bad id",
        &["not a Hugging Face repository id"],
    );
    fails(
        &env.bitnet(&hub.endpoint, &["pull", REPO, "--revision", "../x"]),
        "pull of a bad revision",
        &["--revision"],
    );
    // Port 9 (discard) on loopback: nothing listens.
    fails(
        &env.bitnet("http://127.0.0.1:9", &["pull", REPO]),
        "pull from no server",
        &["cannot reach", "127.0.0.1:9"],
    );
    assert!(!env.repo_dir().exists(), "failed pulls leave nothing in the cache");
}

#[test]
fn a_dropped_connection_resumes_where_it_stopped() {
    let model = std::fs::read(fixture_dir().join("model.safetensors")).unwrap();
    let half = model.len() / 2;

    // Within one run: the retry asks for the rest only.
    let hub = FakeHub::start(checkpoint_files());
    hub.state.lock().unwrap().cut.insert("model.safetensors".into(), (half, 1));
    let env = Env::new();
    let path =
        PathBuf::from(succeeds(&env.bitnet(&hub.endpoint, &["pull", REPO]), "pull with a drop").trim());
    assert_eq!(std::fs::read(path.join("model.safetensors")).unwrap(), model);
    let log = hub.log();
    let resumed = format!("/resolve/{COMMIT}/model.safetensors bytes={half}-");
    assert!(log.iter().any(|l| l.contains(&resumed)), "no request resumed at byte {half}: {log:#?}");

    // Across runs: the first stops with the part kept, the second resumes it.
    let hub = FakeHub::start(checkpoint_files());
    hub.state.lock().unwrap().cut.insert("model.safetensors".into(), (half, 1));
    let env = Env::new();
    fails(
        &env.bitnet(&hub.endpoint, &["pull", REPO, "--retries", "0"]),
        "pull that drops without retries",
        &["model.safetensors", "run the same command again to resume"],
    );
    let part = env.repo_dir().join("blobs").join(format!("{}.part", sha256(&model)));
    assert_eq!(
        std::fs::metadata(&part).map(|m| m.len()).ok(),
        Some(half as u64),
        "the part file keeps what arrived"
    );
    assert!(env.snapshot().join("model.safetensors").symlink_metadata().is_err());
    hub.clear_log();
    let path = PathBuf::from(
        succeeds(&env.bitnet(&hub.endpoint, &["pull", REPO, "--retries", "0"]), "resumed pull").trim(),
    );
    assert_eq!(std::fs::read(path.join("model.safetensors")).unwrap(), model);
    let log = hub.log();
    assert!(
        log.iter().any(|l| l.contains(&resumed)),
        "the second run did not resume at byte {half}: {log:#?}"
    );
    assert!(!part.exists());
}

#[test]
fn a_gated_repository_needs_the_token_and_hf_hub_cache_moves_the_cache() {
    let hub = FakeHub::start(checkpoint_files());
    hub.state.lock().unwrap().token = Some("hf_secret".into());
    let env = Env::new();
    fails(&env.bitnet(&hub.endpoint, &["pull", REPO]), "pull of a gated repository", &["gated", "HF_TOKEN"]);
    let wrong = [("HF_TOKEN", Path::new("hf_wrong"))];
    fails(
        &env.bitnet_with(&hub.endpoint, &wrong, &["pull", REPO]),
        "pull with a wrong token",
        &["no access"],
    );
    // The token of `huggingface-cli login` (HF_HOME/token) is read too.
    std::fs::create_dir_all(&env.hf_home).unwrap();
    std::fs::write(env.hf_home.join("token"), "hf_secret\n").unwrap();
    let elsewhere = env.hf_home.parent().unwrap().join("elsewhere");
    let vars = [("HF_HUB_CACHE", elsewhere.as_path())];
    let out = env.bitnet_with(&hub.endpoint, &vars, &["pull", REPO, "-q"]);
    let path = PathBuf::from(succeeds(&out, "pull with the login token and HF_HUB_CACHE").trim());
    assert_eq!(path, elsewhere.join("models--test-org--tiny-bitnet/snapshots").join(COMMIT));
    assert!(path.join("model.safetensors").is_file());
    assert!(!env.repo_dir().exists(), "HF_HUB_CACHE replaces HF_HOME/hub");
    assert!(text(&out.stderr).is_empty(), "--quiet prints nothing: {}", text(&out.stderr));
}
