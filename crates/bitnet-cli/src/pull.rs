//! `bitnet pull ORG/NAME`: download the files a model needs from the Hugging Face Hub into the
//! Hub's own cache (`$HF_HOME/hub`, the layout `huggingface_hub` and `hf-hub` share, so a model
//! already fetched by Python is not fetched again), and print where they are.
//!
//! The transfer is `hf-hub`'s (sync, over ureq): its metadata request, its lock, and its
//! `.part` file that a broken or interrupted download resumes from with an HTTP Range request.
//! What it does not do is done here: the repository listing with sizes and hashes
//! (`?blobs=true`), the choice of files, and the check of every file against the listing — the
//! SHA-256 of an LFS file, the git blob SHA-1 of a small one, and the size — before the file is
//! reported. A file that fails the check is removed from the cache (link and blob), so nothing
//! that looks complete is wrong. Nothing is written outside the cache.

use std::fmt::Write as _;
use std::io::Read;
use std::path::{Component, Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::Args;
use hf_hub::api::sync::{Api, ApiBuilder, ApiError};
use hf_hub::{Cache, Repo, RepoType};
use serde::Deserialize;
use sha1::Sha1;
use sha2::{Digest as _, Sha256};

#[derive(Args)]
pub struct PullArgs {
    /// The model's repository on the Hugging Face Hub, `ORG/NAME`.
    pub repo: String,
    /// Branch, tag or commit to download.
    #[arg(long, default_value = "main")]
    pub revision: String,
    /// Download this file only (repeatable), for example the one `.gguf` of a repository that
    /// holds several. Without it: a checkpoint's config, tokenizer and safetensors files, or
    /// the repository's only `.gguf`.
    #[arg(long = "file", value_name = "NAME")]
    pub files: Vec<String>,
    /// Download the files whose names match GLOB too (repeatable; `*` and `?`), e.g. `"*.md"`.
    #[arg(long = "include", value_name = "GLOB")]
    pub include: Vec<String>,
    /// How often a broken transfer is retried, each time resuming where it stopped.
    #[arg(long, default_value_t = 5)]
    pub retries: usize,
    /// No progress bars or per-file lines on stderr; only the path on stdout.
    #[arg(short, long)]
    pub quiet: bool,
}

/// Where the Hub is, where its cache is and who is asking: `bitnet pull`'s view of
/// `HF_ENDPOINT`, `HF_HOME`/`HF_HUB_CACHE` and `HF_TOKEN`, read once by [`HubSettings::from_env`].
pub struct HubSettings {
    /// Base URL, without a trailing `/` (`https://huggingface.co`).
    pub endpoint: String,
    /// The hub cache folder: the one holding `models--ORG--NAME/`.
    pub cache_dir: PathBuf,
    /// Access token for private and gated repositories.
    pub token: Option<String>,
}

const DEFAULT_ENDPOINT: &str = "https://huggingface.co";

impl HubSettings {
    /// The settings `huggingface_hub` would use: `HF_ENDPOINT`; `HF_HUB_CACHE`, else
    /// `$HF_HOME/hub`, else `$XDG_CACHE_HOME/huggingface/hub`, else `~/.cache/huggingface/hub`;
    /// `HF_TOKEN`, else the file `HF_TOKEN_PATH` (default `$HF_HOME/token`) that
    /// `huggingface-cli login` writes.
    pub fn from_env() -> Result<Self> {
        let var = |name: &str| std::env::var_os(name).filter(|v| !v.is_empty());
        let endpoint = match var("HF_ENDPOINT") {
            Some(v) => v.into_string().map_err(|_| anyhow::anyhow!("HF_ENDPOINT is not valid UTF-8"))?,
            None => DEFAULT_ENDPOINT.to_owned(),
        };
        let hf_home = match (var("HF_HOME"), var("XDG_CACHE_HOME"), var("HOME")) {
            (Some(home), _, _) => PathBuf::from(home),
            (None, Some(xdg), _) => PathBuf::from(xdg).join("huggingface"),
            (None, None, Some(home)) => PathBuf::from(home).join(".cache").join("huggingface"),
            (None, None, None) => bail!("cannot find the Hugging Face cache: set HF_HOME (or HOME)"),
        };
        let cache_dir = var("HF_HUB_CACHE").map(PathBuf::from).unwrap_or_else(|| hf_home.join("hub"));
        let token = match var("HF_TOKEN") {
            Some(t) => t.into_string().ok(),
            None => {
                let path = var("HF_TOKEN_PATH").map(PathBuf::from).unwrap_or_else(|| hf_home.join("token"));
                std::fs::read_to_string(path).ok()
            }
        }
        .map(|t| t.trim().to_owned())
        .filter(|t| !t.is_empty());
        Ok(Self { endpoint: endpoint.trim_end_matches('/').to_owned(), cache_dir, token })
    }
}

/// `bitnet pull`: downloads, verifies, prints the local path (a folder, or the `.gguf` file).
pub fn pull(a: PullArgs) -> Result<()> {
    let settings = HubSettings::from_env()?;
    let path = pull_model(&settings, &a)?;
    println!("{}", path.display());
    Ok(())
}

/// Downloads what `a` asks for and returns the path to give `--model`.
pub fn pull_model(hub: &HubSettings, a: &PullArgs) -> Result<PathBuf> {
    let repo_id = checked_repo_id(&a.repo)?;
    checked_revision(&a.revision)?;
    let api = ApiBuilder::from_cache(Cache::new(hub.cache_dir.clone()))
        .with_endpoint(hub.endpoint.clone())
        .with_token(hub.token.clone())
        .with_progress(false)
        .with_retries(a.retries)
        .build()
        .context("setting up the Hugging Face Hub client")?;
    let listing = list_repository(&api, hub, repo_id, &a.revision)?;
    let cache = RepoCache::new(&hub.cache_dir, repo_id);
    let fetcher = Fetcher { api: &api, hub, repo_id, cache: &cache, commit: &listing.commit, quiet: a.quiet };
    let wanted = choose_files(&listing, a, &fetcher)?;
    for file in &wanted.files {
        fetcher.fetch(file)?;
    }
    if a.revision != listing.commit {
        // refs/main → the commit, as huggingface_hub records a branch or tag it resolved.
        Cache::new(hub.cache_dir.clone())
            .repo(Repo::with_revision(repo_id.to_owned(), RepoType::Model, a.revision.clone()))
            .create_ref(&listing.commit)
            .with_context(|| format!("recording {} of {repo_id} in {}", a.revision, cache.root.display()))?;
    }
    let snapshot = cache.snapshot(&listing.commit);
    Ok(match wanted.output {
        Output::Folder => snapshot,
        Output::File(name) => snapshot.join(name),
    })
}

/// `--model ORG/NAME` for a model `bitnet pull` (or huggingface_hub) already fetched: its
/// snapshot of `main` in the Hub cache, without the network — the folder, or the file where the
/// snapshot holds one `.gguf` and no config.json. Any other path is returned as it is.
pub fn cached_model(path: &Path) -> PathBuf {
    let found = || -> Option<PathBuf> {
        if path.exists() {
            return None;
        }
        let id = path.to_str().filter(|id| id.contains('/'))?;
        checked_repo_id(id).ok()?;
        let hub = HubSettings::from_env().ok()?;
        let cache = RepoCache::new(&hub.cache_dir, id);
        let commit = std::fs::read_to_string(cache.root.join("refs").join("main")).ok()?;
        let snapshot = cache.snapshot(commit.trim());
        if snapshot.join("config.json").is_file() {
            return Some(snapshot);
        }
        let ggufs: Vec<PathBuf> = std::fs::read_dir(&snapshot)
            .ok()?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|e| e == "gguf"))
            .collect();
        match ggufs.as_slice() {
            [one] => Some(one.clone()),
            _ => None,
        }
    };
    found().unwrap_or_else(|| path.to_path_buf())
}

/// A hint for a `--model` path that does not exist but reads as a repository id.
pub fn missing_model_hint(path: &Path) -> Option<String> {
    let id = path.to_str().filter(|id| id.contains('/') && !path.exists())?;
    checked_repo_id(id).ok()?;
    Some(format!("no such file or folder; to download {id} from the Hugging Face Hub: bitnet pull {id}"))
}

/// `ORG/NAME` (or a bare legacy `NAME`) as the Hub spells repository ids.
fn checked_repo_id(id: &str) -> Result<&str> {
    let part_ok = |p: &str| {
        !p.is_empty()
            && p.len() <= 96
            && p.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
            && !p.contains("..")
            && !p.contains("--")
            // huggingface_hub's rule: each part starts and ends with a letter, digit or `_`.
            && !p.starts_with(['-', '.'])
            && !p.ends_with(['-', '.'])
    };
    let parts: Vec<&str> = id.split('/').collect();
    if parts.len() > 2 || !parts.iter().all(|p| part_ok(p)) {
        bail!(
            "`{id}` is not a Hugging Face repository id: expected ORG/NAME (letters, digits, `-`, `_`, `.`), \
             e.g. microsoft/bitnet-b1.58-2B-4T"
        );
    }
    Ok(id)
}

/// A revision becomes a file name under `refs/`: no way out of it.
fn checked_revision(rev: &str) -> Result<()> {
    let escapes = Path::new(rev).components().any(|c| !matches!(c, Component::Normal(_)));
    if rev.is_empty() || escapes || rev.contains('\\') {
        bail!("--revision `{rev}` is not a branch, tag or commit name");
    }
    Ok(())
}

/// A repository at one commit: the files it holds with their sizes and hashes.
struct Listing {
    commit: String,
    files: Vec<RemoteFile>,
}

/// One file of the listing.
#[derive(Clone, Debug)]
struct RemoteFile {
    name: String,
    size: Option<u64>,
    digest: Option<Digest>,
}

/// The hash a file's content must have: what the Hub names its blob by (the etag).
#[derive(Clone, Debug, PartialEq)]
enum Digest {
    /// An LFS file: the SHA-256 of its bytes.
    Sha256(String),
    /// A file stored in git itself: the git blob id, SHA-1 of `blob {len}\0` and the bytes.
    GitSha1(String),
}

impl Digest {
    /// The digest an etag (a blob's file name in the cache) stands for, if it is one.
    fn from_etag(etag: &str) -> Option<Self> {
        let hex = etag.bytes().all(|b| b.is_ascii_hexdigit());
        match etag.len() {
            64 if hex => Some(Self::Sha256(etag.to_ascii_lowercase())),
            40 if hex => Some(Self::GitSha1(etag.to_ascii_lowercase())),
            _ => None,
        }
    }

    fn hex(&self) -> &str {
        match self {
            Self::Sha256(h) | Self::GitSha1(h) => h,
        }
    }
}

#[derive(Deserialize)]
struct RepoInfoJson {
    sha: String,
    #[serde(default)]
    siblings: Vec<SiblingJson>,
}

#[derive(Deserialize)]
struct SiblingJson {
    rfilename: String,
    size: Option<u64>,
    #[serde(rename = "blobId")]
    blob_id: Option<String>,
    lfs: Option<LfsJson>,
}

#[derive(Deserialize)]
struct LfsJson {
    sha256: String,
    size: Option<u64>,
}

/// `GET /api/models/ORG/NAME/revision/REV?blobs=true`: the commit and every file with its size
/// and hash.
fn list_repository(api: &Api, hub: &HubSettings, repo_id: &str, revision: &str) -> Result<Listing> {
    let repo = api.repo(Repo::with_revision(repo_id.to_owned(), RepoType::Model, revision.to_owned()));
    let response = repo.info_request().query("blobs", "true").call().map_err(|e| {
        let what = format!("{repo_id} (revision {revision})");
        request_error(e, hub, &what)
    })?;
    let info: RepoInfoJson = response.into_json().with_context(|| {
        format!("{} sent a repository listing of {repo_id} that is not valid", hub.endpoint)
    })?;
    if info.sha.len() != 40 || !info.sha.bytes().all(|b| b.is_ascii_hexdigit()) {
        bail!("{} gave `{}` as the commit of {repo_id}: not a commit id", hub.endpoint, info.sha);
    }
    let files = info
        .siblings
        .into_iter()
        .map(|s| {
            let (size, digest) = match s.lfs {
                Some(lfs) => (lfs.size.or(s.size), Digest::from_etag(&lfs.sha256)),
                None => (s.size, s.blob_id.as_deref().and_then(Digest::from_etag)),
            };
            RemoteFile { name: s.rfilename, size, digest }
        })
        .collect();
    Ok(Listing { commit: info.sha.to_ascii_lowercase(), files })
}

/// An HTTP failure in words a user can act on.
fn request_error(e: ureq::Error, hub: &HubSettings, what: &str) -> anyhow::Error {
    match e {
        ureq::Error::Status(status, response) => {
            let code = response.header("x-error-code").unwrap_or("").to_owned();
            let hint = if hub.token.is_some() {
                "check the name; for a gated model, accept its license on the Hub with the account of HF_TOKEN"
            } else {
                "check the name; a private or gated model needs a token: set HF_TOKEN (or `huggingface-cli login`)"
            };
            match (status, code.as_str()) {
                (_, "RevisionNotFound") => {
                    anyhow::anyhow!("{what} not found on {}: no such revision", hub.endpoint)
                }
                (_, "EntryNotFound") => anyhow::anyhow!("{what} not found on {}: no such file", hub.endpoint),
                (_, "GatedRepo") if hub.token.is_none() => anyhow::anyhow!(
                    "{what} is gated on {}: accept its license on the Hub, then set HF_TOKEN \
                     (or `huggingface-cli login`)",
                    hub.endpoint
                ),
                (_, "GatedRepo") => anyhow::anyhow!(
                    "{what} is gated on {} and HF_TOKEN's account has no access: accept its license on the Hub",
                    hub.endpoint
                ),
                (401 | 403 | 404, _) => {
                    anyhow::anyhow!("{what} not found on {} (HTTP {status}): {hint}", hub.endpoint)
                }
                _ => anyhow::anyhow!("{} answered HTTP {status} for {what}", hub.endpoint),
            }
        }
        ureq::Error::Transport(t) => anyhow::anyhow!("cannot reach {} for {what}: {t}", hub.endpoint),
    }
}

/// What to download and what to print.
struct Wanted {
    files: Vec<RemoteFile>,
    output: Output,
}

enum Output {
    /// The snapshot folder: a checkpoint.
    Folder,
    /// One file in it: a `.gguf`.
    File(String),
}

/// The files of a checkpoint besides its weights that loading or chatting reads, if present.
const CHECKPOINT_FILES: [&str; 6] = [
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
];

/// `--file` names exactly; otherwise a safetensors checkpoint (what `TensorStore::open_dir`
/// reads: `model.safetensors`, else the shards the index names) with its config and tokenizer,
/// or the only `.gguf`; `--include` adds matches.
fn choose_files(listing: &Listing, a: &PullArgs, fetcher: &Fetcher) -> Result<Wanted> {
    let find = |name: &str| listing.files.iter().find(|f| f.name == name);
    let mut wanted = Vec::new();
    let output = if !a.files.is_empty() {
        for name in &a.files {
            let file = find(name).with_context(|| {
                format!("{} has no file `{name}`; it holds: {}", a.repo, file_names(listing))
            })?;
            wanted.push(file.clone());
        }
        match a.files.as_slice() {
            [one] if one.ends_with(".gguf") => Output::File(one.clone()),
            _ => Output::Folder,
        }
    } else if listing.files.iter().any(|f| f.name.ends_with(".safetensors")) {
        if find("config.json").is_none() {
            bail!(
                "{} holds safetensors files but no config.json: not a checkpoint this engine loads",
                a.repo
            );
        }
        for name in CHECKPOINT_FILES {
            wanted.extend(find(name).cloned());
        }
        if let Some(single) = find("model.safetensors") {
            wanted.push(single.clone());
        } else if let Some(index) = find("model.safetensors.index.json") {
            let index_path = fetcher.fetch(index)?; // fetched first: it names the shards
            for shard in shard_names(&index_path)? {
                let file = find(&shard).with_context(|| {
                    format!("{} names the shard `{shard}`, which {} does not hold", index.name, a.repo)
                })?;
                wanted.push(file.clone());
            }
        } else {
            bail!(
                "{} has no model.safetensors or model.safetensors.index.json (it holds: {})",
                a.repo,
                file_names(listing)
            );
        }
        if find("tokenizer.json").is_none() && !a.quiet {
            eprintln!(
                "note: {} has no tokenizer.json: give prompts as ids (--tokens), or put the base model's \
                 tokenizer.json beside the files (README: Getting a model)",
                a.repo
            );
        }
        Output::Folder
    } else {
        let ggufs: Vec<&RemoteFile> = listing.files.iter().filter(|f| f.name.ends_with(".gguf")).collect();
        match ggufs.as_slice() {
            [one] => {
                wanted.push((*one).clone());
                Output::File(one.name.clone())
            }
            [] => bail!(
                "{} holds no safetensors checkpoint and no .gguf file (it holds: {})",
                a.repo,
                file_names(listing)
            ),
            several => {
                let names: Vec<&str> = several.iter().map(|f| f.name.as_str()).collect();
                bail!("{} holds several .gguf files; choose one with --file: {}", a.repo, names.join(", "))
            }
        }
    };
    for pattern in &a.include {
        let matches: Vec<&RemoteFile> =
            listing.files.iter().filter(|f| glob_match(pattern, &f.name)).collect();
        if matches.is_empty() {
            bail!("--include {pattern} matches no file of {} (it holds: {})", a.repo, file_names(listing));
        }
        wanted.extend(matches.into_iter().cloned());
    }
    let mut seen = std::collections::HashSet::new();
    wanted.retain(|f| seen.insert(f.name.clone()));
    for f in &wanted {
        checked_file_name(&f.name)?;
    }
    Ok(Wanted { files: wanted, output })
}

/// The listing's names, for error messages (the first 20).
fn file_names(listing: &Listing) -> String {
    let mut s = String::new();
    for (i, f) in listing.files.iter().enumerate() {
        if i == 20 {
            let _ = write!(s, ", … ({} more)", listing.files.len() - 20);
            break;
        }
        if i > 0 {
            s.push_str(", ");
        }
        s.push_str(&f.name);
    }
    if s.is_empty() {
        s.push_str("no files");
    }
    s
}

/// A file name from the server becomes a path in the cache: relative, no `..`.
fn checked_file_name(name: &str) -> Result<()> {
    let plain = Path::new(name).components().all(|c| matches!(c, Component::Normal(_)));
    if name.is_empty() || !plain || name.contains('\\') {
        bail!("the repository lists a file named `{name}`, which is not a plain relative path; refusing it");
    }
    Ok(())
}

/// The shard files `model.safetensors.index.json` names in its `weight_map`, in first-use order.
fn shard_names(index: &Path) -> Result<Vec<String>> {
    let text = std::fs::read_to_string(index).with_context(|| format!("reading {}", index.display()))?;
    let json: serde_json::Value =
        serde_json::from_str(&text).with_context(|| format!("{} is not valid JSON", index.display()))?;
    let map = json
        .get("weight_map")
        .and_then(|m| m.as_object())
        .with_context(|| format!("{} has no `weight_map` object", index.display()))?;
    let mut shards: Vec<String> = Vec::new();
    for file in map.values() {
        let file = file
            .as_str()
            .with_context(|| format!("{}: a weight_map entry is not a name", index.display()))?;
        if !shards.iter().any(|s| s == file) {
            shards.push(file.to_owned());
        }
    }
    Ok(shards)
}

/// fnmatch-style: `*` any run of characters (`/` included, as huggingface_hub's patterns),
/// `?` one character, everything else itself.
fn glob_match(pattern: &str, name: &str) -> bool {
    let (p, n): (Vec<char>, Vec<char>) = (pattern.chars().collect(), name.chars().collect());
    let (mut pi, mut ni) = (0, 0);
    // Where the last `*` was and how much of the name it has taken so far.
    let mut star: Option<(usize, usize)> = None;
    while ni < n.len() {
        match p.get(pi) {
            Some('*') => {
                star = Some((pi, ni));
                pi += 1;
            }
            Some(&c) if c == '?' || c == n[ni] => {
                pi += 1;
                ni += 1;
            }
            _ => match star {
                Some((sp, sn)) => {
                    pi = sp + 1;
                    ni = sn + 1;
                    star = Some((sp, sn + 1));
                }
                None => return false,
            },
        }
    }
    p[pi..].iter().all(|&c| c == '*')
}

/// One repository's folder in the hub cache: `models--ORG--NAME/{blobs,snapshots,refs}`.
struct RepoCache {
    root: PathBuf,
}

impl RepoCache {
    fn new(cache_dir: &Path, repo_id: &str) -> Self {
        let folder = Repo::model(repo_id.to_owned()).folder_name();
        Self { root: cache_dir.join(folder) }
    }

    fn snapshot(&self, commit: &str) -> PathBuf {
        self.root.join("snapshots").join(commit)
    }

    fn blob(&self, digest: &Digest) -> PathBuf {
        self.root.join("blobs").join(digest.hex())
    }

    /// The blob a snapshot entry stands for (the entry itself where it is a plain file), if it
    /// lies inside this repository's folder: only such files are ever removed.
    fn blob_behind(&self, entry: &Path) -> Option<PathBuf> {
        let real = std::fs::canonicalize(entry).ok()?;
        let root = std::fs::canonicalize(&self.root).ok()?;
        real.starts_with(&root).then_some(real)
    }

    /// Removes a snapshot entry that failed its check, and its blob.
    fn discard(&self, entry: &Path) {
        if let Some(blob) = self.blob_behind(entry) {
            let _ = std::fs::remove_file(blob);
        }
        let _ = std::fs::remove_file(entry);
    }
}

/// Fetches and checks files of one repository at one commit.
struct Fetcher<'a> {
    api: &'a Api,
    hub: &'a HubSettings,
    repo_id: &'a str,
    cache: &'a RepoCache,
    commit: &'a str,
    quiet: bool,
}

impl Fetcher<'_> {
    /// The file's path in the snapshot, downloaded unless a verified copy is already there.
    fn fetch(&self, file: &RemoteFile) -> Result<PathBuf> {
        let entry = self.cache.snapshot(self.commit).join(&file.name);
        if entry.exists() {
            match verify(&entry, file, self.cache.blob_behind(&entry).as_deref()) {
                Ok(()) => {
                    self.say(file, "already downloaded");
                    return Ok(entry);
                }
                Err(e) => {
                    eprintln!(
                        "warning: the cached {} fails its check ({e:#}); downloading it again",
                        file.name
                    );
                    self.cache.discard(&entry);
                }
            }
        } else if entry.symlink_metadata().is_ok() {
            // A link whose blob is gone: hf-hub would keep it and fail.
            let _ = std::fs::remove_file(&entry);
        }
        if self.reuse_blob(file, &entry)? {
            self.say(file, "linked (already in the cache)");
            return Ok(entry);
        }
        self.finish_whole_part(file)?;
        let repo = Repo::with_revision(self.repo_id.to_owned(), RepoType::Model, self.commit.to_owned());
        let bar = DownloadBar::new(self.quiet);
        let path = self
            .api
            .repo(repo)
            .download_with_progress(&file.name, bar)
            .map_err(|e| self.download_error(e, file))?;
        // hf-hub records the commit it downloaded from as a ref named after itself; the
        // branch's ref is written at the end, as huggingface_hub does.
        let _ = std::fs::remove_file(self.cache.root.join("refs").join(self.commit));
        if path != entry {
            bail!(
                "{} moved while downloading (got {} instead of {}); run the command again",
                self.repo_id,
                path.display(),
                entry.display()
            );
        }
        if let Err(e) = verify(&entry, file, self.cache.blob_behind(&entry).as_deref()) {
            self.cache.discard(&entry);
            return Err(e.context(format!(
                "{} of {} downloaded from {} is damaged; removed it from the cache",
                file.name, self.repo_id, self.hub.endpoint
            )));
        }
        self.say(file, "downloaded");
        Ok(entry)
    }

    /// A blob with the file's hash already in the cache (another snapshot holds it): check it
    /// and link it instead of downloading it again.
    fn reuse_blob(&self, file: &RemoteFile, entry: &Path) -> Result<bool> {
        let Some(digest) = &file.digest else { return Ok(false) };
        let blob = self.cache.blob(digest);
        if !blob.is_file() {
            return Ok(false);
        }
        if verify(&blob, file, Some(&blob)).is_err() {
            let _ = std::fs::remove_file(&blob);
            return Ok(false);
        }
        let parent = entry.parent().context("a snapshot entry has a folder")?;
        std::fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
        link_to_blob(&self.cache.root, &blob, entry)?;
        Ok(true)
    }

    /// A `.part` file that already holds every byte (a run stopped between the last byte and
    /// the rename) would make hf-hub ask for the range past the end, which the Hub refuses:
    /// complete it here if it is right, drop it if it is not.
    fn finish_whole_part(&self, file: &RemoteFile) -> Result<()> {
        let (Some(digest), Some(size)) = (&file.digest, file.size) else { return Ok(()) };
        let blob = self.cache.blob(digest);
        let part = blob.with_extension("part");
        let Ok(meta) = std::fs::metadata(&part) else { return Ok(()) };
        if meta.len() < size {
            return Ok(()); // a partial download hf-hub resumes
        }
        if meta.len() == size && verify(&part, file, None).is_ok() {
            std::fs::rename(&part, &blob).with_context(|| format!("renaming {}", part.display()))?;
        } else {
            std::fs::remove_file(&part).with_context(|| format!("removing the bad {}", part.display()))?;
        }
        Ok(())
    }

    fn download_error(&self, e: ApiError, file: &RemoteFile) -> anyhow::Error {
        let what = format!("{} of {}", file.name, self.repo_id);
        let resume = "what arrived is kept: run the same command again to resume";
        match e {
            ApiError::RequestError(e) => request_error(*e, self.hub, &what),
            ApiError::TooManyRetries(e) => {
                anyhow::anyhow!("downloading {what} failed after retries ({e}); {resume}")
            }
            ApiError::IoError(e) => anyhow::anyhow!("downloading {what}: {e}; {resume}"),
            ApiError::MissingHeader(h) | ApiError::InvalidHeader(h) => anyhow::anyhow!(
                "{} sent no usable `{h}` header for {what}: is HF_ENDPOINT a Hugging Face Hub?",
                self.hub.endpoint
            ),
            other => anyhow::anyhow!("downloading {what}: {other}"),
        }
    }

    fn say(&self, file: &RemoteFile, what: &str) {
        if !self.quiet {
            let size = file.size.map(|s| format!(" ({})", indicatif::HumanBytes(s))).unwrap_or_default();
            eprintln!("{}{size}: {what}", file.name);
        }
    }
}

/// A relative symlink `entry → blob`, as the Hub cache holds them (a copy where links fail).
fn link_to_blob(root: &Path, blob: &Path, entry: &Path) -> Result<()> {
    #[cfg(unix)]
    {
        // From the entry's folder (`snapshots/COMMIT[/sub…]`) up to the repository's folder.
        let entry_dir =
            entry.parent().and_then(|d| d.strip_prefix(root).ok()).context("an entry of a snapshot")?;
        let mut target: PathBuf = entry_dir.components().map(|_| Component::ParentDir).collect();
        target.push("blobs");
        target.push(blob.file_name().context("a blob has a name")?);
        std::os::unix::fs::symlink(&target, entry).with_context(|| format!("linking {}", entry.display()))
    }
    #[cfg(not(unix))]
    {
        let _ = root;
        std::fs::copy(blob, entry).map(|_| ()).with_context(|| format!("copying to {}", entry.display()))
    }
}

/// Checks `path` against the listing's size and hash; without a hash in the listing, against
/// the etag the blob is named by.
fn verify(path: &Path, file: &RemoteFile, blob: Option<&Path>) -> Result<()> {
    let len = std::fs::metadata(path).with_context(|| format!("reading {}", path.display()))?.len();
    if let Some(size) = file.size {
        if len != size {
            bail!("{} is {len} bytes; the repository lists {size}", file.name);
        }
    }
    let from_etag = blob.and_then(|b| b.file_name()?.to_str().and_then(Digest::from_etag));
    let Some(expected) = file.digest.clone().or(from_etag) else {
        eprintln!("warning: {}: the server gave no hash for it; only its size was checked", file.name);
        return Ok(());
    };
    let actual = digest_of(path, &expected, len)?;
    if actual != expected.hex() {
        let kind = match expected {
            Digest::Sha256(_) => "SHA-256",
            Digest::GitSha1(_) => "git blob SHA-1",
        };
        bail!("{}: {kind} {actual} differs from the repository's {}", file.name, expected.hex());
    }
    Ok(())
}

/// The hex digest of `path`'s bytes, of the same kind as `like`.
fn digest_of(path: &Path, like: &Digest, len: u64) -> Result<String> {
    let mut f = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut buf = vec![0u8; 1 << 20];
    let mut hash_all = |update: &mut dyn FnMut(&[u8])| -> Result<()> {
        loop {
            let n = f.read(&mut buf).with_context(|| format!("reading {}", path.display()))?;
            if n == 0 {
                return Ok(());
            }
            update(&buf[..n]);
        }
    };
    let bytes = match like {
        Digest::Sha256(_) => {
            let mut h = Sha256::new();
            hash_all(&mut |b| h.update(b))?;
            h.finalize().to_vec()
        }
        Digest::GitSha1(_) => {
            let mut h = Sha1::new();
            h.update(format!("blob {len}\0").as_bytes());
            hash_all(&mut |b| h.update(b))?;
            h.finalize().to_vec()
        }
    };
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

/// hf-hub's progress callbacks on an indicatif bar (hidden with `--quiet` or off a terminal).
struct DownloadBar(indicatif::ProgressBar);

impl DownloadBar {
    fn new(quiet: bool) -> Self {
        let bar = if quiet { indicatif::ProgressBar::hidden() } else { indicatif::ProgressBar::new(0) };
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "{msg:30} {bar:30} {bytes}/{total_bytes} {bytes_per_sec} {eta}",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        Self(bar)
    }
}

impl hf_hub::api::Progress for DownloadBar {
    fn init(&mut self, size: usize, filename: &str) {
        self.0.set_length(size as u64);
        self.0.set_position(0);
        self.0.set_message(filename.to_owned());
    }

    fn update(&mut self, size: usize) {
        self.0.inc(size as u64);
    }

    fn finish(&mut self) {
        self.0.finish_and_clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs_match_like_fnmatch() {
        assert!(glob_match("*.md", "README.md"));
        assert!(glob_match("*.safetensors", "model-00001-of-00002.safetensors"));
        assert!(glob_match("model-0000?-of-*", "model-00002-of-00002.safetensors"));
        assert!(glob_match("*", "a/b.json"));
        assert!(glob_match("a*b*c", "aXXbYYc"));
        assert!(!glob_match("*.md", "README.mdx"));
        assert!(!glob_match("a*b*c", "aXXbYY"));
        assert!(!glob_match("?", ""));
    }

    #[test]
    fn repository_ids_and_revisions_are_checked() {
        assert!(checked_repo_id("microsoft/bitnet-b1.58-2B-4T").is_ok());
        assert!(checked_repo_id("gpt2").is_ok());
        for bad in ["", "a/b/c", "../x", "a/..", "a b/c", "org/-", "/name", "a--b/c"] {
            assert!(checked_repo_id(bad).is_err(), "{bad}");
        }
        assert!(checked_revision("main").is_ok());
        assert!(checked_revision("refs/pr/1").is_ok());
        for bad in ["", "../main", "/abs", "a/../../b", "a\\b"] {
            assert!(checked_revision(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn server_file_names_stay_inside_the_snapshot() {
        assert!(checked_file_name("config.json").is_ok());
        assert!(checked_file_name("onnx/model.onnx").is_ok());
        for bad in ["", "../x", "/etc/passwd", "a/../../b", "a\\b"] {
            assert!(checked_file_name(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn etags_name_their_digest() {
        let sha = "a".repeat(64);
        assert_eq!(Digest::from_etag(&sha), Some(Digest::Sha256(sha.clone())));
        assert_eq!(Digest::from_etag(&"B".repeat(40)), Some(Digest::GitSha1("b".repeat(40))));
        assert_eq!(Digest::from_etag("W/\"abc\""), None);
        assert_eq!(Digest::from_etag(&"g".repeat(64)), None);
    }

    #[test]
    fn git_blob_ids_are_computed_as_git_does() {
        // `printf 'hello\n' | git hash-object --stdin`
        let dir = std::env::temp_dir().join(format!("bitnet-pull-digest-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("hello.txt");
        std::fs::write(&path, b"hello\n").unwrap();
        let like = Digest::GitSha1(String::new());
        assert_eq!(digest_of(&path, &like, 6).unwrap(), "ce013625030ba8dba906f756967f9e9ca394464a");
        let sha = digest_of(&path, &Digest::Sha256(String::new()), 6).unwrap();
        assert_eq!(sha, "5891b5b522d5df086d0ff0b110fbd9d21bb4fc7163af34d08286a2e846f6be03");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
