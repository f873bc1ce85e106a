//! Temporary files: removed when dropped unless persisted, and all removed by `abandon_all`
//! (what the CLI's signal handler calls). Its own test binary: `abandon_all` is process-wide.

use std::io::Write;

use bitnet_models::temp_file::{abandon_all, beside, in_progress, TempFile};

#[test]
fn dropped_files_are_removed_persisted_ones_kept_and_abandon_removes_the_rest() {
    let dir = tempfile::tempdir().unwrap();
    let dest = dir.path().join("out.bin");
    let (tmp, mut f) = TempFile::create(beside(&dest), |p| std::fs::File::create(p)).unwrap();
    f.write_all(b"half").unwrap();
    let tmp_path = tmp.path().to_path_buf();
    assert!(tmp_path.exists() && in_progress().contains(&tmp_path));
    drop(tmp);
    assert!(!tmp_path.exists(), "an unfinished file is removed");
    assert!(!in_progress().contains(&tmp_path));

    let (tmp, mut f) = TempFile::create(beside(&dest), |p| std::fs::File::create(p)).unwrap();
    f.write_all(b"whole").unwrap();
    tmp.persist(&dest).unwrap();
    assert_eq!(std::fs::read(&dest).unwrap(), b"whole");
    assert!(!tmp_path.exists());

    let (tmp, _f) = TempFile::create(dir.path().join("x.tmp"), |p| std::fs::File::create(p)).unwrap();
    let removed = abandon_all();
    assert!(removed.contains(&tmp.path().to_path_buf()));
    assert!(!tmp.path().exists(), "abandon_all removes files still being written");
    assert!(tmp.persist(&dir.path().join("x")).is_err(), "nothing is renamed after abandon_all");
    let again = TempFile::create(dir.path().join("y.tmp"), |p| std::fs::File::create(p));
    assert!(again.is_err() && !dir.path().join("y.tmp").exists(), "nor created");
}
