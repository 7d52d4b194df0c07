//! The checkpoint signing key: Ed25519, the private key in PKCS#8 PEM (mode 0600), the public
//! key in SubjectPublicKeyInfo PEM, so `openssl pkeyutl -verify -rawin` can check a checkpoint
//! as well as `domicile audit verify`.

use std::io::Write;
use std::path::{Path, PathBuf};

use ed25519_dalek::pkcs8::{DecodePrivateKey, DecodePublicKey, EncodePrivateKey, EncodePublicKey};
pub use ed25519_dalek::{SigningKey, VerifyingKey};

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("cannot read key file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is not an Ed25519 {kind} key in PEM ({detail}); make one with `domicile audit keygen`")]
    Parse {
        path: PathBuf,
        kind: &'static str,
        detail: String,
    },
    #[error("{path} already exists; pass --force to replace it")]
    Exists { path: PathBuf },
    #[error("cannot write key file {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot encode the key: {0}")]
    Encode(String),
}

/// Reads a private key written by [`generate`].
pub fn load_signing_key(path: &Path) -> Result<SigningKey, KeyError> {
    let text = std::fs::read_to_string(path).map_err(|source| KeyError::Read {
        path: path.to_owned(),
        source,
    })?;
    SigningKey::from_pkcs8_pem(&text).map_err(|e| KeyError::Parse {
        path: path.to_owned(),
        kind: "private",
        detail: e.to_string(),
    })
}

/// Reads a public key (PEM), as `domicile audit verify --key` takes it.
pub fn load_verifying_key(path: &Path) -> Result<VerifyingKey, KeyError> {
    let text = std::fs::read_to_string(path).map_err(|source| KeyError::Read {
        path: path.to_owned(),
        source,
    })?;
    parse_verifying_key(&text).map_err(|detail| KeyError::Parse {
        path: path.to_owned(),
        kind: "public",
        detail,
    })
}

/// Parses a public key in PEM.
pub fn parse_verifying_key(text: &str) -> Result<VerifyingKey, String> {
    VerifyingKey::from_public_key_pem(text.trim()).map_err(|e| e.to_string())
}

/// The public key in PEM.
pub fn public_pem(key: &VerifyingKey) -> Result<String, KeyError> {
    key.to_public_key_pem(Default::default())
        .map_err(|e| KeyError::Encode(e.to_string()))
}

/// Makes a key pair: the private key at `private` (mode 0600), the public key at `public`.
/// Refuses to replace existing files unless `force`.
pub fn generate(private: &Path, public: &Path, force: bool) -> Result<VerifyingKey, KeyError> {
    for path in [private, public] {
        if !force && path.exists() {
            return Err(KeyError::Exists {
                path: path.to_owned(),
            });
        }
    }
    let key = SigningKey::generate(&mut rand::rngs::OsRng);
    let pem = key
        .to_pkcs8_pem(Default::default())
        .map_err(|e| KeyError::Encode(e.to_string()))?;
    write_file(private, pem.as_bytes(), 0o600)?;
    let verifying = key.verifying_key();
    write_file(public, public_pem(&verifying)?.as_bytes(), 0o644)?;
    Ok(verifying)
}

/// Writes `bytes` to `path` through a temporary file, created with `mode` (never readable by
/// others for a moment, as a chmod after writing would allow), then renamed over it.
fn write_file(path: &Path, bytes: &[u8], mode: u32) -> Result<(), KeyError> {
    use std::os::unix::fs::OpenOptionsExt;
    let err = |source| KeyError::Write {
        path: path.to_owned(),
        source,
    };
    let tmp = path.with_extension(format!("tmp-{}", std::process::id()));
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)
        .map_err(err)?;
    let written = file
        .write_all(bytes)
        .and_then(|()| file.sync_all())
        .and_then(|()| std::fs::rename(&tmp, path));
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(err(e));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn generated_keys_load_and_keep_their_mode() {
        let dir = tempfile::tempdir().unwrap();
        let private = dir.path().join("audit.key");
        let public = dir.path().join("audit.pub");
        let verifying = generate(&private, &public, false).unwrap();
        assert_eq!(
            load_signing_key(&private).unwrap().verifying_key(),
            verifying
        );
        assert_eq!(load_verifying_key(&public).unwrap(), verifying);
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&private), 0o600);
        assert_eq!(mode(&public), 0o644);
        assert!(matches!(
            generate(&private, &public, false),
            Err(KeyError::Exists { .. })
        ));
        let other = generate(&private, &public, true).unwrap();
        assert_ne!(other, verifying);
    }

    #[test]
    fn wrong_files_are_clear_errors() {
        let dir = tempfile::tempdir().unwrap();
        let junk = dir.path().join("junk.pem");
        std::fs::write(&junk, "not a key").unwrap();
        let err = load_signing_key(&junk).unwrap_err().to_string();
        assert!(err.contains("junk.pem") && err.contains("private"), "{err}");
        let err = load_verifying_key(&junk).unwrap_err().to_string();
        assert!(err.contains("public"), "{err}");
        let missing = load_signing_key(&dir.path().join("nope")).unwrap_err();
        assert!(matches!(missing, KeyError::Read { .. }));
        // A private key is not a public key.
        let private = dir.path().join("k");
        generate(&private, &dir.path().join("k.pub"), false).unwrap();
        assert!(load_verifying_key(&private).is_err());
    }
}
