//! The host-side twin of the guest's `cpuburn` (tests/guest/cpuburn.c): the
//! same integer and SSE double arithmetic, so the host knows the answer the
//! guest must print even when SMIs interrupt it a thousand times.

/// The value `cpuburn n` prints (as 16 lowercase hex digits).
pub fn cpuburn(n: u64) -> u64 {
    let (mut x, mut acc) = (0u64, 0u64);
    let mut f = 1.0f64;
    for _ in 0..n {
        x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = x;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        f = f * 0.999999 + (z & 0xffff) as f64 * 1e-6;
        acc = acc.wrapping_mul(31).wrapping_add(z) ^ f.to_bits();
    }
    acc
}

/// What `cpuburn n` prints, without the newline.
pub fn cpuburn_output(n: u64) -> String {
    format!("{:016x}", cpuburn(n))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    #[test]
    fn zero_iterations() {
        assert_eq!(cpuburn_output(0), "0000000000000000");
    }

    /// Ground truth: the C program itself, compiled on the host.
    #[test]
    fn matches_the_c_program() {
        let src = concat!(env!("CARGO_MANIFEST_DIR"), "/guest/cpuburn.c");
        let dir = std::env::temp_dir().join(format!("smmvmi-cpuburn-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let bin = dir.join("cpuburn");
        let built = Command::new("gcc")
            .args(crate::guest_image::GUEST_CFLAGS)
            .arg("-o")
            .arg(&bin)
            .arg(src)
            .status();
        if !matches!(built, Ok(s) if s.success()) {
            eprintln!("gcc unavailable: skipping the C comparison");
            return;
        }
        for n in [1u64, 7, 100_000] {
            let out = Command::new(&bin).arg(n.to_string()).output().unwrap();
            assert_eq!(
                String::from_utf8_lossy(&out.stdout).trim(),
                cpuburn_output(n),
                "n={n}"
            );
        }
        let _ = std::fs::remove_dir_all(dir);
    }
}
