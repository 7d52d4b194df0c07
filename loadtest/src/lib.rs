//! Domicile's benchmarks: the side-by-side comparison with nginx, HAProxy and Caddy
//! ([`compare`]) and the scale measurements shared by the `loadtest` command and the criterion
//! benches (the synthetic workspace population both use, so that the bench and `map-memory`
//! measure the same map).

pub mod chaos;
pub mod compare;
pub mod control_plane;
pub mod fleet;
pub mod moves;
pub mod origin;
pub mod peers;
pub mod procs;
pub mod tools;

pub mod synthetic {
    //! A deterministic population of workspaces with a realistic mix of id lengths.

    /// splitmix64's finaliser: a cheap, well-mixed hash of a counter.
    pub fn mix(mut x: u64) -> u64 {
        x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
        x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        x ^ (x >> 31)
    }

    /// The id of workspace `i`: 70% are `ws-<i>` (at most 11 bytes for `i < 10^8`), 10%
    /// `<i>-engineering`, 20% 24 to 26 bytes (`acme-corporation-<i>`,
    /// `workspace-<i>-staging`). With the map's 19-byte inline keys, about 80% live in the slot.
    pub fn workspace_id(i: u64) -> String {
        match mix(i) % 10 {
            0..=6 => format!("ws-{i}"),
            7 => format!("{i}-engineering"),
            8 => format!("acme-corporation-{i}"),
            _ => format!("workspace-{i:08}-staging"),
        }
    }

    /// The two regions of the synthetic map, as its catalogue lists them.
    pub fn catalogue() -> [domicile_proxy::route::map::CatalogueRegion; 2] {
        [
            ("us", "United States", *b"US"),
            ("eu", "European Union", *b"DE"),
        ]
        .map(
            |(id, name, country)| domicile_proxy::route::map::CatalogueRegion {
                id: id.into(),
                name: name.into(),
                jurisdiction: vec![country],
            },
        )
    }

    /// Half of the workspaces live in `eu`, half in `us`.
    pub fn home_is_eu(i: u64) -> bool {
        (mix(i) >> 32) & 1 == 1
    }
}
