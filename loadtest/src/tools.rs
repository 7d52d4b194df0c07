//! The load generators `compare` drives (wrk, oha, h2load) and what their output means.
//!
//! Each run returns one [`LoadResult`]. Parsing is kept apart from running so the parsers are
//! tested on the tools' real output formats.

use anyhow::{bail, Context, Result};
use serde::Serialize;

/// Latency percentiles of one run, in microseconds.
#[derive(Debug, Clone, Copy, Default, Serialize, PartialEq)]
pub struct Percentiles {
    pub p50: f64,
    pub p99: f64,
    pub p999: f64,
}

/// What one load-generator run measured.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct LoadResult {
    /// Completed requests (any status).
    pub requests: u64,
    /// Wall time of the run in seconds, as the tool measured it.
    pub seconds: f64,
    /// Responses whose status was not 2xx.
    pub non_2xx: u64,
    /// Connect, read, write and timeout errors.
    pub socket_errors: u64,
    pub latency_us: Option<Percentiles>,
}

impl LoadResult {
    pub fn requests_per_second(&self) -> f64 {
        if self.seconds > 0.0 {
            self.requests as f64 / self.seconds
        } else {
            0.0
        }
    }
}

/// The Lua script wrk runs: optional request setup, then one JSON line at the end.
pub fn wrk_script(method: &str, body_bytes: usize, close: bool) -> String {
    let mut script = String::new();
    script.push_str(&format!("wrk.method = \"{method}\"\n"));
    if body_bytes > 0 {
        script.push_str(&format!(
            "wrk.body = string.rep(\"x\", {body_bytes})\nwrk.headers[\"Content-Type\"] = \"application/octet-stream\"\n"
        ));
    }
    if close {
        script.push_str("wrk.headers[\"Connection\"] = \"close\"\n");
    }
    script.push_str(
        r#"done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    "WRK_JSON {\"requests\":%d,\"duration_us\":%d,\"connect\":%d,\"read\":%d,\"write\":%d,\"status\":%d,\"timeout\":%d,\"p50\":%d,\"p99\":%d,\"p999\":%d}\n",
    summary.requests, summary.duration, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(99), latency:percentile(99.9)))
end
"#,
    );
    script
}

/// Reads the `WRK_JSON` line [`wrk_script`] makes wrk print.
pub fn parse_wrk(stdout: &str) -> Result<LoadResult> {
    let line = stdout
        .lines()
        .find_map(|l| l.strip_prefix("WRK_JSON "))
        .context("wrk printed no WRK_JSON line (did the script run?)")?;
    let v: serde_json::Value = serde_json::from_str(line).context("wrk's JSON line")?;
    let n = |k: &str| {
        v[k].as_f64()
            .with_context(|| format!("wrk JSON has no {k}"))
    };
    Ok(LoadResult {
        requests: n("requests")? as u64,
        seconds: n("duration_us")? / 1e6,
        // wrk counts a response with status > 399 as a status error; nothing here answers 3xx.
        non_2xx: n("status")? as u64,
        socket_errors: (n("connect")? + n("read")? + n("write")? + n("timeout")?) as u64,
        latency_us: Some(Percentiles {
            p50: n("p50")?,
            p99: n("p99")?,
            p999: n("p999")?,
        }),
    })
}

/// Reads `oha --output-format json`: a fixed-rate run with coordinated-omission correction.
pub fn parse_oha(stdout: &str) -> Result<LoadResult> {
    let start = stdout.find('{').context("oha printed no JSON")?;
    let v: serde_json::Value = serde_json::from_str(&stdout[start..]).context("oha's JSON")?;
    let mut requests = 0u64;
    let mut non_2xx = 0u64;
    if let Some(codes) = v["statusCodeDistribution"].as_object() {
        for (code, count) in codes {
            let count = count.as_u64().unwrap_or(0);
            requests += count;
            if !code.starts_with('2') {
                non_2xx += count;
            }
        }
    }
    let socket_errors = v["errorDistribution"]
        .as_object()
        .map_or(0, |errors| errors.values().filter_map(|c| c.as_u64()).sum());
    let seconds = v["summary"]["total"]
        .as_f64()
        .context("oha JSON has no summary.total")?;
    let percentile = |k: &str| -> Result<f64> {
        Ok(v["latencyPercentiles"][k]
            .as_f64()
            .with_context(|| format!("oha JSON has no latencyPercentiles.{k}"))?
            * 1e6)
    };
    Ok(LoadResult {
        requests,
        seconds,
        non_2xx,
        socket_errors,
        latency_us: Some(Percentiles {
            p50: percentile("p50")?,
            p99: percentile("p99")?,
            p999: percentile("p99.9")?,
        }),
    })
}

fn numbers_before(line: &str, words: &[&str]) -> Result<Vec<u64>> {
    words
        .iter()
        .map(|word| {
            line.split(',')
                .map(str::trim)
                .find_map(|part| part.strip_suffix(word).map(str::trim))
                .and_then(|n| n.rsplit(' ').next())
                .and_then(|n| n.parse().ok())
                .with_context(|| format!("no count for {word:?} in {line:?}"))
        })
        .collect()
}

/// Reads h2load's summary (it reports no percentiles, only counts and the duration).
pub fn parse_h2load(stdout: &str) -> Result<LoadResult> {
    let finished = stdout
        .lines()
        .find_map(|l| l.strip_prefix("finished in "))
        .context("h2load printed no 'finished in' line")?;
    let seconds = finished
        .split(',')
        .next()
        .and_then(|d| {
            let d = d.trim();
            if let Some(ms) = d.strip_suffix("ms") {
                ms.parse::<f64>().ok().map(|ms| ms / 1e3)
            } else {
                d.strip_suffix('s').and_then(|s| s.parse::<f64>().ok())
            }
        })
        .with_context(|| format!("h2load duration in {finished:?}"))?;
    let requests_line = stdout
        .lines()
        .find_map(|l| l.strip_prefix("requests: "))
        .context("h2load printed no 'requests:' line")?;
    let counts = numbers_before(
        requests_line,
        &["succeeded", "failed", "errored", "timeout"],
    )?;
    let status_line = stdout
        .lines()
        .find_map(|l| l.strip_prefix("status codes: "))
        .context("h2load printed no 'status codes:' line")?;
    let statuses = numbers_before(status_line, &["2xx", "3xx", "4xx", "5xx"])?;
    if counts[0] == 0 && statuses[0] == 0 && counts[1] == 0 {
        bail!("h2load completed no request:\n{stdout}");
    }
    Ok(LoadResult {
        requests: statuses.iter().sum(),
        seconds,
        non_2xx: statuses[1] + statuses[2] + statuses[3],
        socket_errors: counts[2] + counts[3],
        latency_us: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wrk_line() {
        let out = "Running 2s test @ http://127.0.0.1:1/\n  1 threads and 64 connections\nRequests/sec:  1000\nWRK_JSON {\"requests\":20000,\"duration_us\":2000000,\"connect\":0,\"read\":1,\"write\":0,\"status\":3,\"timeout\":2,\"p50\":410,\"p99\":1900,\"p999\":5200}\n";
        let r = parse_wrk(out).unwrap();
        assert_eq!(r.requests, 20000);
        assert_eq!(r.requests_per_second(), 10000.0);
        assert_eq!(r.non_2xx, 3);
        assert_eq!(r.socket_errors, 3);
        assert_eq!(r.latency_us.unwrap().p999, 5200.0);
        assert!(parse_wrk("Requests/sec: 1000").is_err());
    }

    #[test]
    fn oha_json() {
        let out = r#"{"summary":{"successRate":1.0,"total":5.001,"requestsPerSec":2000.0},
            "latencyPercentiles":{"p10":0.0001,"p50":0.0002,"p99":0.0015,"p99.9":0.004},
            "statusCodeDistribution":{"200":9990,"503":10},"errorDistribution":{"aborted due to deadline":32}}"#;
        let r = parse_oha(out).unwrap();
        assert_eq!(r.requests, 10000);
        assert_eq!(r.non_2xx, 10);
        assert_eq!(r.socket_errors, 32);
        let p = r.latency_us.unwrap();
        assert!((p.p50 - 200.0).abs() < 1e-6 && (p.p999 - 4000.0).abs() < 1e-6);
    }

    #[test]
    fn h2load_summary() {
        let out = "starting benchmark...\n\nfinished in 5.00s, 41234.20 req/s, 3.01MB/s\nrequests: 206171 total, 206427 started, 206171 done, 206100 succeeded, 71 failed, 0 errored, 2 timeout\nstatus codes: 206100 2xx, 0 3xx, 0 4xx, 71 5xx\ntraffic: 15.06MB\n";
        let r = parse_h2load(out).unwrap();
        assert_eq!(r.requests, 206171);
        assert_eq!(r.non_2xx, 71);
        assert_eq!(r.socket_errors, 2);
        assert!((r.seconds - 5.0).abs() < 1e-9);
        let short = out.replace("5.00s", "950.12ms");
        assert!((parse_h2load(&short).unwrap().seconds - 0.95012).abs() < 1e-9);
        assert!(parse_h2load("connect failed").is_err());
    }
}
