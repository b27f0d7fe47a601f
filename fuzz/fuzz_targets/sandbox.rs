//! A scratch folder per fuzzing process, laid out as `root/a/b/dest` so an
//! entry that escapes `dest` with `..` lands where [`Sandbox::check`] looks.

use std::fs;
use std::path::{Path, PathBuf};

pub struct Sandbox {
    root: PathBuf,
    pub dest: PathBuf,
}

impl Sandbox {
    pub fn new(tag: &str) -> Sandbox {
        let root = std::env::temp_dir().join(format!("ferry-fuzz-{tag}-{}", std::process::id()));
        let dest = root.join("a/b/dest");
        Sandbox { root, dest }
    }

    /// Empties the sandbox; `dest` itself does not exist afterwards.
    pub fn reset(&self) {
        let _ = fs::remove_dir_all(&self.root);
        fs::create_dir_all(self.root.join("a/b")).expect("create the sandbox");
    }

    /// Nothing was written beside `dest`, and `dest` holds only regular
    /// files and folders.
    pub fn check(&self) {
        assert_eq!(names(&self.root), ["a"], "written beside a/ in the sandbox");
        assert_eq!(names(&self.root.join("a")), ["b"], "written beside b/");
        let beside = names(&self.root.join("a/b"));
        assert!(
            beside.is_empty() || beside == ["dest"],
            "written beside dest/: {beside:?}"
        );
        walk(&self.dest);
    }
}

fn names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(dir)
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

fn walk(dir: &Path) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let meta = fs::symlink_metadata(e.path()).expect("stat an extracted path");
        if meta.is_dir() {
            walk(&e.path());
        } else {
            assert!(
                meta.is_file(),
                "{} is neither a file nor a folder",
                e.path().display()
            );
        }
    }
}
