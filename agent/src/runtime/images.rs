//! Moving a container's image: only the layers the target lacks.
//!
//! An image's layers are named by diff ids (`RootFS.Layers`), and a layer
//! store keys a layer by its chain id, which also covers every layer below
//! it. The target says which of the image's chain ids it has; the source
//! writes `docker save` output (`GET /images/{id}/get`) with those layers'
//! `layer.tar` left out. `docker load` (moby `image/tarexport/load.go`)
//! looks each layer up by chain id first and opens its `layer.tar` only when
//! the chain is missing, so the shortened tar loads into the same image id.

use std::collections::HashSet;
use std::fs::File;
use std::io::{self, Read, Seek};
use std::path::Path;

use bollard::query_parameters::{ImportImageOptions, ListImagesOptions, TagImageOptions};
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::docker::engine_err;
use super::state::StateError;
use super::Docker;

/// A container's image as both sides name it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageRef {
    /// `sha256:...`, the image (config) id.
    pub id: String,
    /// What the container was created from (`Config.Image`), e.g. `redis:7`.
    pub reference: String,
    /// `RootFS.Layers`, bottom first.
    pub diff_ids: Vec<String>,
    /// The engine's size of the image: what a whole export about weighs,
    /// and so the cap on what the target accepts for it.
    #[serde(default)]
    pub size: u64,
}

/// What [`filter_save_tar`] wrote.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ImageExport {
    /// Bytes of the tar written: what travels.
    pub tar_bytes: u64,
    pub layers_sent: u64,
    pub layers_left_out: u64,
    /// Layer bytes not written because the target has them.
    pub bytes_left_out: u64,
}

/// Chain ids of a layer stack: the first is its diff id, each next one is
/// `sha256(parent chain id + " " + diff id)`.
pub fn chain_ids(diff_ids: &[String]) -> Vec<String> {
    let mut out: Vec<String> = Vec::with_capacity(diff_ids.len());
    for d in diff_ids {
        let chain = match out.last() {
            None => d.clone(),
            Some(parent) => format!(
                "sha256:{}",
                hex::encode(Sha256::digest(format!("{parent} {d}").as_bytes()))
            ),
        };
        out.push(chain);
    }
    out
}

/// The diff ids whose `layer.tar` need not travel: every place the image
/// uses that layer sits on a chain the target has.
pub fn layers_to_leave_out(diff_ids: &[String], have_chains: &HashSet<String>) -> HashSet<String> {
    let chains = chain_ids(diff_ids);
    diff_ids
        .iter()
        .filter(|d| {
            diff_ids
                .iter()
                .zip(&chains)
                .filter(|(d2, _)| d2 == d)
                .all(|(_, c)| have_chains.contains(c))
        })
        .cloned()
        .collect()
}

/// `repo` and `tag` of a reference to re-tag on the target, or `None` when
/// the container was created from an id or a digest (nothing to tag).
pub fn tag_of(reference: &str, id: &str) -> Option<(String, String)> {
    let hex = id.trim_start_matches("sha256:");
    let bare = reference.trim_start_matches("sha256:");
    let is_id = !bare.is_empty()
        && bare.len() <= 64
        && bare.bytes().all(|b| b.is_ascii_hexdigit())
        && hex.starts_with(bare);
    if reference.is_empty() || reference.contains('@') || is_id {
        return None;
    }
    let last_slash = reference.rfind('/').map_or(0, |i| i + 1);
    match reference[last_slash..].rfind(':') {
        Some(i) => {
            let at = last_slash + i;
            Some((reference[..at].to_string(), reference[at + 1..].to_string()))
        }
        None => Some((reference.to_string(), "latest".to_string())),
    }
}

/// Copies a `docker save` tar from `input` to `out`, leaving out each
/// `*/layer.tar` whose sha256 (its diff id) is in `leave_out`. Each entry is
/// written as it is read; a left-out layer is cut off the file again once
/// its digest is known, so nothing is held in memory or spooled.
pub fn filter_save_tar(
    input: impl Read,
    out: &mut File,
    leave_out: &HashSet<String>,
) -> Result<ImageExport, StateError> {
    let bad = |e: io::Error| StateError::Image {
        image: "export".into(),
        reason: format!("reading the engine's image tar: {e}"),
    };
    let write_err = |e: io::Error| StateError::Io {
        context: "writing the image tar".into(),
        source: e,
    };
    let mut stats = ImageExport::default();
    let mut archive = tar::Archive::new(input);
    let mut builder = tar::Builder::new(&mut *out);
    let mut entry_start: Option<u64> = None;
    for entry in archive.entries().map_err(bad)?.raw(true) {
        let mut entry = entry.map_err(bad)?;
        let header = entry.header().clone();
        let etype = header.entry_type();
        let start = match entry_start {
            Some(s) => s,
            None => builder.get_mut().stream_position().map_err(write_err)?,
        };
        let is_layer = etype.is_file() && entry.path_bytes().ends_with(b"/layer.tar");
        let mut hashing = Hashing {
            inner: &mut entry,
            hash: Sha256::new(),
        };
        builder.append(&header, &mut hashing).map_err(write_err)?;
        if etype.is_gnu_longname() || etype.is_gnu_longlink() || etype.is_pax_local_extensions() {
            // Describes the next entry: cut together with it if need be.
            entry_start = Some(start);
            continue;
        }
        entry_start = None;
        if !is_layer {
            continue;
        }
        let digest = format!("sha256:{}", hex::encode(hashing.hash.finalize()));
        if leave_out.contains(&digest) {
            let file = builder.get_mut();
            let end = file.stream_position().map_err(write_err)?;
            file.set_len(start).map_err(write_err)?;
            file.seek(io::SeekFrom::Start(start)).map_err(write_err)?;
            stats.layers_left_out += 1;
            stats.bytes_left_out += end - start;
        } else {
            stats.layers_sent += 1;
        }
    }
    builder.finish().map_err(write_err)?;
    drop(builder);
    stats.tar_bytes = out.stream_position().map_err(write_err)?;
    Ok(stats)
}

struct Hashing<'a, R> {
    inner: &'a mut R,
    hash: Sha256,
}

impl<R: Read> Read for Hashing<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hash.update(&buf[..n]);
        Ok(n)
    }
}

/// Blocking reader over chunks sent from an async task.
struct ChunkReader<B> {
    rx: tokio::sync::mpsc::Receiver<Result<B, io::Error>>,
    current: B,
    pos: usize,
}

impl<B: AsRef<[u8]>> Read for ChunkReader<B> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.pos >= self.current.as_ref().len() {
            match self.rx.blocking_recv() {
                None => return Ok(0),
                Some(chunk) => {
                    self.current = chunk?;
                    self.pos = 0;
                }
            }
        }
        let rest = &self.current.as_ref()[self.pos..];
        let n = buf.len().min(rest.len());
        buf[..n].copy_from_slice(&rest[..n]);
        self.pos += n;
        Ok(n)
    }
}

impl Docker {
    /// The image a container was created from, by id, with its layers.
    pub async fn image_ref(&self, id: &str, reference: &str) -> Result<ImageRef, StateError> {
        let image = self
            .api()
            .inspect_image(id)
            .await
            .map_err(engine_err("inspect image", id))?;
        Ok(ImageRef {
            id: image.id.unwrap_or_else(|| id.to_string()),
            reference: reference.to_string(),
            diff_ids: image.root_fs.and_then(|r| r.layers).unwrap_or_default(),
            size: image.size.and_then(|s| u64::try_from(s).ok()).unwrap_or(0),
        })
    }

    /// Target: `None` when the image id is here; otherwise which of its
    /// chain ids any local image has.
    pub async fn image_chains_present(
        &self,
        image: &ImageRef,
    ) -> Result<Option<HashSet<String>>, StateError> {
        match self.api().inspect_image(&image.id).await {
            Ok(_) => return Ok(None),
            Err(bollard::errors::Error::DockerResponseServerError {
                status_code: 404, ..
            }) => {}
            Err(e) => return Err(engine_err("inspect image", &image.id)(e).into()),
        }
        let wanted: HashSet<String> = chain_ids(&image.diff_ids).into_iter().collect();
        let options = ListImagesOptions {
            all: true,
            ..Default::default()
        };
        let list = self
            .api()
            .list_images(Some(options))
            .await
            .map_err(engine_err("list images", "engine"))?;
        let mut have = HashSet::new();
        for summary in list {
            let layers = match self.api().inspect_image(&summary.id).await {
                Ok(i) => i.root_fs.and_then(|r| r.layers).unwrap_or_default(),
                // Removed meanwhile: it has nothing to offer.
                Err(_) => continue,
            };
            have.extend(
                chain_ids(&layers)
                    .into_iter()
                    .filter(|c| wanted.contains(c)),
            );
        }
        Ok(Some(have))
    }

    /// Source: `docker save` of the image id into `out`, without the layers
    /// whose chains the target has.
    pub async fn export_image_delta(
        &self,
        image: &ImageRef,
        have_chains: &HashSet<String>,
        out: &Path,
    ) -> Result<ImageExport, StateError> {
        let leave_out = layers_to_leave_out(&image.diff_ids, have_chains);
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        let out_path = out.to_path_buf();
        let filter = tokio::task::spawn_blocking(move || {
            let mut file = File::options()
                .read(true)
                .write(true)
                .create(true)
                .truncate(true)
                .open(&out_path)
                .map_err(|e| StateError::io(&out_path, "creating", e))?;
            let reader = ChunkReader {
                rx,
                current: Default::default(),
                pos: 0,
            };
            let stats = filter_save_tar(
                io::BufReader::with_capacity(1 << 20, reader),
                &mut file,
                &leave_out,
            )?;
            file.sync_all()
                .map_err(|e| StateError::io(&out_path, "syncing", e))?;
            Ok::<_, StateError>(stats)
        });
        let mut stream = self.api().export_image(&image.id);
        let mut engine_error = None;
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|e| {
                let msg = e.to_string();
                engine_error = Some(engine_err("export image", &image.id)(e));
                io::Error::other(msg)
            });
            let failed = chunk.is_err();
            if tx.send(chunk).await.is_err() || failed {
                break;
            }
        }
        drop(tx);
        let result = filter.await.map_err(|e| StateError::Io {
            context: "the image filter task".into(),
            source: io::Error::other(e),
        })?;
        match (engine_error, result) {
            (Some(e), _) => Err(e.into()),
            (None, r) => r,
        }
    }

    /// Target: loads a tar from [`Docker::export_image_delta`] and checks
    /// that the image id is here afterwards.
    pub async fn load_image_tar(&self, image: &ImageRef, tar: &Path) -> Result<(), StateError> {
        let file = tokio::fs::File::open(tar)
            .await
            .map_err(|e| StateError::io(tar, "opening", e))?;
        let chunks = futures_util::stream::unfold(file, |mut file| async move {
            use tokio::io::AsyncReadExt;
            let mut buf = vec![0u8; 1 << 20];
            match file.read(&mut buf).await {
                Ok(0) => None,
                Ok(n) => {
                    buf.truncate(n);
                    Some((Ok::<_, io::Error>(buf.into()), file))
                }
                Err(e) => Some((Err(e), file)),
            }
        });
        let options = ImportImageOptions {
            quiet: true,
            ..Default::default()
        };
        let mut progress = self.api().import_image_stream(options, chunks, None);
        while let Some(item) = progress.next().await {
            item.map_err(|e| StateError::Image {
                image: image.id.clone(),
                reason: format!("load failed: {e}"),
            })?;
        }
        match self.api().inspect_image(&image.id).await {
            Ok(_) => Ok(()),
            Err(e) => Err(StateError::Image {
                image: image.id.clone(),
                reason: format!("not present after the load: {e}"),
            }),
        }
    }

    /// Target: points the container's image reference at the image id.
    pub async fn tag_image_like(&self, image: &ImageRef) -> Result<(), StateError> {
        let Some((repo, tag)) = tag_of(&image.reference, &image.id) else {
            return Ok(());
        };
        let options = TagImageOptions {
            repo: Some(repo),
            tag: Some(tag),
        };
        self.api()
            .tag_image(&image.id, Some(options))
            .await
            .map_err(engine_err("tag image", &image.reference))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stream::testutil::{noise, TempDir};

    fn sha(data: &[u8]) -> String {
        format!("sha256:{}", hex::encode(Sha256::digest(data)))
    }

    #[test]
    fn chain_ids_follow_the_oci_rule() {
        let a = "sha256:aaaa".to_string();
        let b = "sha256:bbbb".to_string();
        let chains = chain_ids(&[a.clone(), b.clone()]);
        assert_eq!(chains[0], a);
        assert_eq!(chains[1], sha(b"sha256:aaaa sha256:bbbb"));
        assert!(chain_ids(&[]).is_empty());
    }

    #[test]
    fn only_layers_on_chains_the_target_has_are_left_out() {
        let d: Vec<String> = ["sha256:1", "sha256:2", "sha256:3"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let chains = chain_ids(&d);
        let have: HashSet<String> = chains[..2].iter().cloned().collect();
        let out = layers_to_leave_out(&d, &have);
        assert_eq!(out, HashSet::from([d[0].clone(), d[1].clone()]));
        // The same diff id on a chain the target lacks must still travel.
        let same = vec![d[0].clone(), d[1].clone(), d[0].clone()];
        let out = layers_to_leave_out(&same, &have);
        assert_eq!(out, HashSet::from([d[1].clone()]));
        // A diff id alone is not enough: its chain must match.
        let other = vec![d[1].clone()];
        assert!(layers_to_leave_out(&other, &have).is_empty());
    }

    #[test]
    fn tags_to_apply() {
        let id = "sha256:289ffcae9418e08e61197ba1ca244ebac281f5c1da99942c609b8ba0c2b4e52c";
        assert_eq!(tag_of("redis:7", id), Some(("redis".into(), "7".into())));
        assert_eq!(tag_of("redis", id), Some(("redis".into(), "latest".into())));
        assert_eq!(
            tag_of("host:5000/a/b:v1", id),
            Some(("host:5000/a/b".into(), "v1".into()))
        );
        assert_eq!(
            tag_of("host:5000/a/b", id),
            Some(("host:5000/a/b".into(), "latest".into()))
        );
        assert_eq!(tag_of("redis@sha256:abcd", id), None);
        assert_eq!(tag_of(id, id), None);
        assert_eq!(tag_of("289ffcae9418", id), None);
    }

    /// A `docker save`-shaped tar: two layer folders, a config, a manifest.
    fn save_tar(layers: &[Vec<u8>]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        for (i, data) in layers.iter().enumerate() {
            let mut h = tar::Header::new_gnu();
            h.set_size(data.len() as u64);
            h.set_mode(0o644);
            h.set_cksum();
            b.append_data(&mut h, format!("{:064x}/layer.tar", i + 1), &data[..])
                .unwrap();
            let mut h = tar::Header::new_gnu();
            h.set_size(3);
            h.set_mode(0o644);
            b.append_data(&mut h, format!("{:064x}/VERSION", i + 1), &b"1.0"[..])
                .unwrap();
        }
        let manifest = br#"[{"Config":"c.json","Layers":["..."]}]"#;
        let mut h = tar::Header::new_gnu();
        h.set_size(manifest.len() as u64);
        h.set_mode(0o644);
        b.append_data(&mut h, "manifest.json", &manifest[..])
            .unwrap();
        b.into_inner().unwrap()
    }

    fn names(tar_bytes: &[u8]) -> Vec<String> {
        tar::Archive::new(tar_bytes)
            .entries()
            .unwrap()
            .map(|e| e.unwrap().path().unwrap().display().to_string())
            .collect()
    }

    #[test]
    fn filter_cuts_only_the_layers_the_target_has() {
        let layers = vec![noise(300_000, 1), noise(5_000, 2)];
        let input = save_tar(&layers);
        let dir = TempDir::new("image-filter");

        let mut full = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(dir.join("full.tar"))
            .unwrap();
        let stats = filter_save_tar(&input[..], &mut full, &HashSet::new()).unwrap();
        assert_eq!(stats.layers_sent, 2);
        assert_eq!(stats.layers_left_out, 0);
        let full_bytes = std::fs::read(dir.join("full.tar")).unwrap();
        assert_eq!(names(&full_bytes), names(&input));
        assert_eq!(stats.tar_bytes, full_bytes.len() as u64);

        let mut delta = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(dir.join("delta.tar"))
            .unwrap();
        let leave_out = HashSet::from([sha(&layers[0])]);
        let stats = filter_save_tar(&input[..], &mut delta, &leave_out).unwrap();
        assert_eq!((stats.layers_sent, stats.layers_left_out), (1, 1));
        let delta_bytes = std::fs::read(dir.join("delta.tar")).unwrap();
        assert_eq!(stats.tar_bytes, delta_bytes.len() as u64);
        assert!(delta_bytes.len() < full_bytes.len() - 300_000);
        let mut expected = names(&input);
        expected.retain(|n| !n.starts_with(&format!("{:064x}/layer.tar", 1)));
        assert_eq!(names(&delta_bytes), expected);
        // The kept layer is byte for byte what the engine wrote.
        let mut archive = tar::Archive::new(&delta_bytes[..]);
        let mut kept = archive
            .entries()
            .unwrap()
            .map(|e| e.unwrap())
            .find(|e| e.path().unwrap().ends_with("layer.tar"))
            .unwrap();
        let mut data = Vec::new();
        kept.read_to_end(&mut data).unwrap();
        assert_eq!(data, layers[1]);
    }
}
