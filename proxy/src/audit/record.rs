//! A routing decision on its way from the request path to the writer, and the JSON line the
//! writer makes of it.
//!
//! The request path does as little as it can: it copies the decision's fields into a fixed
//! header and its strings (request id, workspace, method, host, path) raw into a buffer reused
//! from the worker's pool, and appends both to the writer's queue. Escaping, region and
//! endpoint names, the time, the client's country and the chain hash are the writer's work, on
//! its own thread.

use std::net::IpAddr;
use std::sync::Arc;

use bytemuck::{Pod, Zeroable};

use super::format::{key, put_hex, put_ip, put_json_str, put_time, put_u64};
use crate::config::ClientIpMode;
use crate::refusal::RefusalCode;
use crate::route::geoip::GeoIp;
use crate::route::map::RegionMeta;

/// No region / endpoint.
pub(super) const NONE16: u16 = u16::MAX;

pub(super) const HAS_MAP_VERSION: u32 = 1;
pub(super) const HAS_EPOCH: u32 = 1 << 1;
pub(super) const COMPLETE: u32 = 1 << 2;
pub(super) const PATH_TRUNCATED: u32 = 1 << 3;
pub(super) const HOST_TRUNCATED: u32 = 1 << 4;
pub(super) const HAS_HOST: u32 = 1 << 5;
/// Rebuilt at start from the forward journal of a run that did not stop ([`super::journal`]).
pub(super) const RECOVERED: u32 = 1 << 6;

/// Longest path kept in a record; longer ones are cut here and flagged.
pub(super) const MAX_PATH: usize = 1024;
/// Longest host kept in a record.
pub(super) const MAX_HOST: usize = 255;

/// The fixed part of a queued record. `len` counts it and the strings after it.
#[derive(Debug, Clone, Copy, Pod, Zeroable)]
#[repr(C)]
pub(super) struct Fixed {
    pub len: u32,
    pub flags: u32,
    /// When the request arrived, in microseconds since the Unix epoch.
    pub ts_micros: u64,
    pub map_version: u64,
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub duration_us: u64,
    pub epoch: u32,
    /// 0 when no response was sent.
    pub status: u16,
    pub home_region: u16,
    pub upstream_region: u16,
    /// Index of the endpoint in its region's pool.
    pub upstream_endpoint: u16,
    /// 0 = forwarded, 1 + index in [`RefusalCode::ALL`] = refused.
    pub decision: u8,
    /// 0 = none, 4 or 6.
    pub ip_kind: u8,
    pub request_id_len: u8,
    pub workspace_len: u8,
    pub method_len: u8,
    pub _pad: [u8; 3],
    pub host_len: u16,
    pub path_len: u16,
    pub ip: [u8; 16],
}

pub(super) const FIXED: usize = std::mem::size_of::<Fixed>();

impl Fixed {
    pub fn new(ts_micros: u64) -> Self {
        Self {
            ts_micros,
            home_region: NONE16,
            upstream_region: NONE16,
            upstream_endpoint: NONE16,
            ..Zeroable::zeroed()
        }
    }

    pub fn set_ip(&mut self, ip: IpAddr) {
        match ip {
            IpAddr::V4(v4) => {
                self.ip_kind = 4;
                self.ip[..4].copy_from_slice(&v4.octets());
            }
            IpAddr::V6(v6) => {
                self.ip_kind = 6;
                self.ip = v6.octets();
            }
        }
    }

    fn ip(&self) -> Option<IpAddr> {
        match self.ip_kind {
            4 => Some(IpAddr::from([
                self.ip[0], self.ip[1], self.ip[2], self.ip[3],
            ])),
            6 => Some(IpAddr::from(self.ip)),
            _ => None,
        }
    }
}

/// Copies the strings of a record into `buf`, cutting the ones that would overflow their length
/// field. Returns the flags for what was cut.
#[allow(clippy::too_many_arguments)]
pub(super) fn put_strings(
    fixed: &mut Fixed,
    buf: &mut Vec<u8>,
    request_id: &[u8],
    workspace: &[u8],
    method: &[u8],
    host: Option<&[u8]>,
    path: &[u8],
) {
    buf.clear();
    let request_id = &request_id[..request_id.len().min(255)];
    let workspace = &workspace[..workspace.len().min(255)];
    let method = &method[..method.len().min(255)];
    fixed.request_id_len = request_id.len() as u8;
    fixed.workspace_len = workspace.len() as u8;
    fixed.method_len = method.len() as u8;
    buf.extend_from_slice(request_id);
    buf.extend_from_slice(workspace);
    buf.extend_from_slice(method);
    if let Some(host) = host {
        fixed.flags |= HAS_HOST;
        if host.len() > MAX_HOST {
            fixed.flags |= HOST_TRUNCATED;
        }
        let host = &host[..host.len().min(MAX_HOST)];
        fixed.host_len = host.len() as u16;
        buf.extend_from_slice(host);
    }
    if path.len() > MAX_PATH {
        fixed.flags |= PATH_TRUNCATED;
    }
    let path = &path[..path.len().min(MAX_PATH)];
    fixed.path_len = path.len() as u16;
    buf.extend_from_slice(path);
}

/// What the writer needs to turn queued records into lines. Names are kept as JSON strings,
/// quoted once rather than once per record.
pub(super) struct LineContext {
    /// `"proxy_id":"...","edge_region":"..."`.
    pub identity: Vec<u8>,
    /// Endpoint names by region index, then endpoint index.
    endpoints: Vec<Vec<Vec<u8>>>,
    /// Region ids by region index (interned ids never change, so this only grows).
    regions: Vec<Vec<u8>>,
    pub geoip: Option<Arc<GeoIp>>,
    pub client_ip: ClientIpMode,
}

fn quoted(text: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(text.len() + 2);
    put_json_str(&mut out, text);
    out
}

impl LineContext {
    pub fn new(
        identity: Vec<u8>,
        endpoints: Vec<Vec<Arc<str>>>,
        geoip: Option<Arc<GeoIp>>,
        client_ip: ClientIpMode,
    ) -> Self {
        let endpoints = endpoints
            .iter()
            .map(|list| list.iter().map(|e| quoted(e.as_bytes())).collect())
            .collect();
        Self {
            identity,
            endpoints,
            regions: Vec::new(),
            geoip,
            client_ip,
        }
    }

    /// Learns the regions interned since the last batch.
    pub fn regions(&mut self, regions: &[RegionMeta]) {
        for region in regions.iter().skip(self.regions.len()) {
            self.regions.push(quoted(region.id.as_bytes()));
        }
    }
}

/// One queued record, read back from the queue's bytes.
pub(super) struct Queued<'a> {
    pub fixed: Fixed,
    strings: &'a [u8],
}

/// Region and endpoint names given as text rather than as indices of this run's tables: a
/// recovered record's come from the journal of an earlier run, whose indices meant other
/// things.
pub(super) struct Names<'a> {
    pub home_region: Option<&'a [u8]>,
    pub upstream_region: &'a [u8],
    pub upstream: &'a [u8],
}

impl<'a> Queued<'a> {
    pub fn new(fixed: Fixed, strings: &'a [u8]) -> Self {
        Self { fixed, strings }
    }

    /// The record at the start of `bytes`, and the bytes after it.
    pub fn split(bytes: &'a [u8]) -> Option<(Self, &'a [u8])> {
        let fixed: Fixed = bytemuck::try_pod_read_unaligned(bytes.get(..FIXED)?).ok()?;
        let len = fixed.len as usize;
        let record = bytes.get(FIXED..len)?;
        Some((
            Queued {
                fixed,
                strings: record,
            },
            &bytes[len..],
        ))
    }

    /// Appends the record's JSON line (without its newline) to `out`.
    pub fn write_line(&self, seq: u64, prev: &[u8; 32], ctx: &LineContext, out: &mut Vec<u8>) {
        self.write_line_named(seq, prev, ctx, None, out);
    }

    /// [`Queued::write_line`], with the regions and endpoint named by `names` when given.
    pub fn write_line_named(
        &self,
        seq: u64,
        prev: &[u8; 32],
        ctx: &LineContext,
        names: Option<&Names<'_>>,
        out: &mut Vec<u8>,
    ) {
        let f = &self.fixed;
        let mut at = 0;
        let mut take = |n: usize| {
            let s = &self.strings[at.min(self.strings.len())..(at + n).min(self.strings.len())];
            at += n;
            s
        };
        let request_id = take(f.request_id_len as usize);
        let workspace = take(f.workspace_len as usize);
        let method = take(f.method_len as usize);
        let host = take(f.host_len as usize);
        let path = take(f.path_len as usize);
        let region = |out: &mut Vec<u8>, idx: u16| match ctx.regions.get(idx as usize) {
            Some(quoted) => out.extend_from_slice(quoted),
            None => out.extend_from_slice(b"null"),
        };
        out.reserve(640 + self.strings.len());

        out.extend_from_slice(b"{\"type\":\"record\",\"seq\":");
        put_u64(out, seq);
        out.extend_from_slice(key!("ts"));
        put_time(out, f.ts_micros);
        out.push(b',');
        out.extend_from_slice(&ctx.identity);
        out.extend_from_slice(key!("request_id"));
        put_json_str(out, request_id);
        out.extend_from_slice(key!("workspace"));
        put_opt_str(out, (f.workspace_len > 0).then_some(workspace));
        out.extend_from_slice(key!("home_region"));
        match names {
            Some(Names {
                home_region: Some(home),
                ..
            }) => put_json_str(out, home),
            Some(_) => out.extend_from_slice(b"null"),
            None => region(out, f.home_region),
        }
        out.extend_from_slice(key!("decision"));
        match f.decision {
            0 => out.extend_from_slice(b"\"forwarded\""),
            d => {
                // Codes are fixed lower-case words: quoted, never escaped.
                let code = RefusalCode::ALL
                    .get(d as usize - 1)
                    .map_or("unknown", |c| c.as_str());
                out.push(b'"');
                out.extend_from_slice(code.as_bytes());
                out.push(b'"');
            }
        }
        out.extend_from_slice(key!("upstream_region"));
        if let Some(names) = names {
            put_json_str(out, names.upstream_region);
            out.extend_from_slice(key!("upstream"));
            put_json_str(out, names.upstream);
        } else {
            region(out, f.upstream_region);
            out.extend_from_slice(key!("upstream"));
            let endpoint = ctx
                .endpoints
                .get(f.upstream_region as usize)
                .and_then(|list| list.get(f.upstream_endpoint as usize));
            match endpoint {
                Some(quoted) => out.extend_from_slice(quoted),
                None => out.extend_from_slice(b"null"),
            }
        }
        out.extend_from_slice(key!("map_version"));
        put_opt_u64(
            out,
            (f.flags & HAS_MAP_VERSION != 0).then_some(f.map_version),
        );
        out.extend_from_slice(key!("epoch"));
        put_opt_u64(
            out,
            (f.flags & HAS_EPOCH != 0).then_some(u64::from(f.epoch)),
        );
        out.extend_from_slice(key!("method"));
        put_json_str(out, method);
        out.extend_from_slice(key!("host"));
        put_opt_str(out, (f.flags & HAS_HOST != 0).then_some(host));
        out.extend_from_slice(key!("path"));
        put_json_str(out, path);
        if f.flags & (PATH_TRUNCATED | HOST_TRUNCATED) != 0 {
            out.extend_from_slice(key!("truncated"));
            out.extend_from_slice(b"true");
        }
        out.extend_from_slice(key!("status"));
        put_opt_u64(out, (f.status != 0).then_some(u64::from(f.status)));
        out.extend_from_slice(key!("bytes_in"));
        put_u64(out, f.bytes_in);
        out.extend_from_slice(key!("bytes_out"));
        put_u64(out, f.bytes_out);
        out.extend_from_slice(key!("duration_us"));
        put_u64(out, f.duration_us);
        out.extend_from_slice(key!("complete"));
        out.extend_from_slice(if f.flags & COMPLETE != 0 {
            b"true"
        } else {
            b"false"
        });
        let ip = match ctx.client_ip {
            ClientIpMode::None => None,
            _ => f.ip(),
        };
        out.extend_from_slice(key!("client_country"));
        let country = match (&ctx.geoip, f.ip()) {
            (Some(geoip), Some(ip)) => geoip.country(ip),
            _ => None,
        };
        put_opt_str(out, country.as_ref().map(|c| &c[..]));
        out.extend_from_slice(key!("client_ip"));
        match ip {
            Some(ip) => {
                let ip = match ctx.client_ip {
                    ClientIpMode::Truncated => truncate_ip(ip),
                    _ => ip,
                };
                put_ip(out, ip);
            }
            None => out.extend_from_slice(b"null"),
        }
        if f.flags & RECOVERED != 0 {
            out.extend_from_slice(key!("recovered"));
            out.extend_from_slice(b"true");
        }
        out.extend_from_slice(key!("prev"));
        out.push(b'"');
        put_hex(out, prev);
        out.extend_from_slice(b"\"}");
    }
}

fn put_opt_str(out: &mut Vec<u8>, s: Option<&[u8]>) {
    match s {
        Some(s) => put_json_str(out, s),
        None => out.extend_from_slice(b"null"),
    }
}

fn put_opt_u64(out: &mut Vec<u8>, n: Option<u64>) {
    match n {
        Some(n) => put_u64(out, n),
        None => out.extend_from_slice(b"null"),
    }
}

/// The network of `ip`: /24 for IPv4, /48 for IPv6.
pub(super) fn truncate_ip(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(v4) => {
            let [a, b, c, _] = v4.octets();
            IpAddr::from([a, b, c, 0])
        }
        IpAddr::V6(v6) => {
            let mut octets = v6.octets();
            octets[6..].fill(0);
            IpAddr::from(octets)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_truncate_to_their_networks() {
        assert_eq!(
            truncate_ip("81.2.69.142".parse().unwrap()),
            "81.2.69.0".parse::<IpAddr>().unwrap()
        );
        assert_eq!(
            truncate_ip("2a02:f880:1:2:3:4:5:6".parse().unwrap()),
            "2a02:f880:1::".parse::<IpAddr>().unwrap()
        );
    }

    #[test]
    fn long_strings_are_cut_and_flagged() {
        let mut fixed = Fixed::new(0);
        let mut buf = Vec::new();
        let path = vec![b'a'; MAX_PATH + 10];
        let host = vec![b'h'; 300];
        put_strings(
            &mut fixed,
            &mut buf,
            b"id",
            b"acme",
            b"GET",
            Some(&host),
            &path,
        );
        assert_eq!(fixed.path_len as usize, MAX_PATH);
        assert_eq!(fixed.host_len as usize, MAX_HOST);
        assert!(fixed.flags & PATH_TRUNCATED != 0 && fixed.flags & HOST_TRUNCATED != 0);
        assert_eq!(buf.len(), 2 + 4 + 3 + MAX_HOST + MAX_PATH);
    }
}
