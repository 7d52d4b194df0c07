//! GeoIP: the client's country from a MaxMind database (GeoIP2 / GeoLite2, Country or City).
//!
//! Lookups decode only the country's ISO code (no names map), so they do not allocate.

use std::net::IpAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

#[derive(Debug, thiserror::Error)]
pub enum GeoIpError {
    #[error("cannot open MaxMind database {path}: {source}")]
    Open {
        path: PathBuf,
        source: maxminddb::MaxMindDbError,
    },
    #[error("MaxMind database {path} is corrupt: {source}")]
    Corrupt {
        path: PathBuf,
        source: maxminddb::MaxMindDbError,
    },
}

/// A loaded, verified MaxMind database.
pub struct GeoIp {
    reader: maxminddb::Reader<Vec<u8>>,
}

impl std::fmt::Debug for GeoIp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GeoIp")
            .field("database_type", &self.reader.metadata().database_type)
            .finish()
    }
}

#[derive(Deserialize)]
struct CountryRecord<'a> {
    #[serde(borrow)]
    country: Option<IsoCode<'a>>,
    #[serde(borrow)]
    registered_country: Option<IsoCode<'a>>,
}

#[derive(Deserialize)]
struct IsoCode<'a> {
    iso_code: Option<&'a str>,
}

impl GeoIp {
    /// Opens a database and verifies all of it (search tree, data section, metadata), so a
    /// corrupt file is a clear error here and never a failure on the request path.
    pub fn open(path: &Path) -> Result<Self, GeoIpError> {
        let reader = maxminddb::Reader::open_readfile(path).map_err(|source| GeoIpError::Open {
            path: path.to_owned(),
            source,
        })?;
        reader.verify().map_err(|source| GeoIpError::Corrupt {
            path: path.to_owned(),
            source,
        })?;
        Ok(Self { reader })
    }

    /// The ISO 3166-1 alpha-2 country of `ip`, if the database knows it.
    pub fn country(&self, ip: IpAddr) -> Option<[u8; 2]> {
        let found = self.reader.lookup(ip).ok()?;
        let record: CountryRecord<'_> = found.decode().ok()??;
        let code = record
            .country
            .and_then(|c| c.iso_code)
            .or_else(|| record.registered_country.and_then(|c| c.iso_code))?;
        let b = code.as_bytes();
        (b.len() == 2).then(|| [b[0].to_ascii_uppercase(), b[1].to_ascii_uppercase()])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn testdata(name: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../shared/testdata/geoip")
            .join(name)
    }

    #[test]
    fn countries_from_the_real_test_databases() {
        for db in [
            "GeoIP2-Country-Test.mmdb",
            "GeoLite2-Country-Test.mmdb",
            "GeoIP2-City-Test.mmdb",
        ] {
            let geo = GeoIp::open(&testdata(db)).unwrap();
            let cases = [
                ("81.2.69.142", Some(*b"GB")),
                ("89.160.20.112", Some(*b"SE")),
                ("216.160.83.56", Some(*b"US")),
                ("2a02:f880::1", Some(*b"DE")),
                ("2001:218::1", Some(*b"JP")),
                ("127.0.0.1", None),
                ("10.0.0.1", None),
            ];
            for (ip, want) in cases {
                assert_eq!(geo.country(ip.parse().unwrap()), want, "{db} {ip}");
            }
        }
    }

    #[test]
    fn broken_databases_are_clear_errors() {
        for db in [
            "MaxMind-DB-test-broken-pointers-24.mmdb",
            "MaxMind-DB-test-broken-search-tree-24.mmdb",
            "GeoIP2-City-Test-Invalid-Node-Count.mmdb",
            "does-not-exist.mmdb",
        ] {
            let err = GeoIp::open(&testdata(db)).expect_err(db);
            assert!(err.to_string().contains(db), "{err}");
        }
        let not_a_database = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(not_a_database.path(), b"definitely not an mmdb file").unwrap();
        assert!(GeoIp::open(not_a_database.path()).is_err());
    }
}
