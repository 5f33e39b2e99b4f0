//! Device selection: `auto | cpu | cuda[:N] | metal`.
use candle_core::Device;

#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    #[error("unknown device {0:?}: use auto, cpu, cuda, cuda:N or metal")]
    Unknown(String),
    #[error("cannot open {what}: {source} (was medmine built with the matching cargo feature?)")]
    Open {
        what: String,
        source: candle_core::Error,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum DeviceChoice {
    /// CUDA device 0 if built with `cuda` and one is present, else Metal, else CPU.
    #[default]
    Auto,
    Cpu,
    Cuda(usize),
    Metal,
}

impl std::str::FromStr for DeviceChoice {
    type Err = DeviceError;
    fn from_str(s: &str) -> Result<Self, DeviceError> {
        match s {
            "auto" => Ok(Self::Auto),
            "cpu" => Ok(Self::Cpu),
            "metal" => Ok(Self::Metal),
            "cuda" => Ok(Self::Cuda(0)),
            _ => s
                .strip_prefix("cuda:")
                .and_then(|n| n.parse().ok())
                .map(Self::Cuda)
                .ok_or_else(|| DeviceError::Unknown(s.to_string())),
        }
    }
}

impl DeviceChoice {
    /// Opens the device; `auto` also says why it chose what it chose (for the device line),
    /// and falls back to the CPU when a GPU build finds no usable GPU.
    pub fn open_explained(self) -> Result<(Device, Option<String>), DeviceError> {
        if self != Self::Auto {
            return Ok((self.open()?, None));
        }
        let built_cuda = cfg!(feature = "cuda");
        let built_metal = cfg!(feature = "metal");
        if candle_core::utils::cuda_is_available() {
            match Device::new_cuda(0) {
                Ok(d) => return Ok((d, Some("auto: CUDA device 0 found".into()))),
                Err(e) => tracing::warn!("built with CUDA, but cuda:0 cannot be opened ({e})"),
            }
        }
        if candle_core::utils::metal_is_available() {
            match Device::new_metal(0) {
                Ok(d) => return Ok((d, Some("auto: Metal device found".into()))),
                Err(e) => tracing::warn!("built with Metal, but it cannot be opened ({e})"),
            }
        }
        let why = match (built_cuda, built_metal) {
            (false, false) => "auto: built without GPU support (cargo features cuda, metal)",
            _ => "auto: no usable GPU (driver or device missing), using the CPU",
        };
        Ok((Device::Cpu, Some(why.into())))
    }

    pub fn open(self) -> Result<Device, DeviceError> {
        match self {
            Self::Cpu => Ok(Device::Cpu),
            Self::Cuda(n) => Device::new_cuda(n).map_err(|source| DeviceError::Open {
                what: format!("cuda:{n}"),
                source,
            }),
            Self::Metal => Device::new_metal(0).map_err(|source| DeviceError::Open {
                what: "metal".into(),
                source,
            }),
            Self::Auto => {
                if candle_core::utils::cuda_is_available() {
                    if let Ok(d) = Device::new_cuda(0) {
                        return Ok(d);
                    }
                }
                if candle_core::utils::metal_is_available() {
                    if let Ok(d) = Device::new_metal(0) {
                        return Ok(d);
                    }
                }
                Ok(Device::Cpu)
            }
        }
    }
}

/// Human-readable device name and op path, e.g. `cpu (2 threads), ops: fast`,
/// `cpu (2 threads), ops: generic` (`MEDMINE_OPS=generic`) or `cuda:0, ops: generic`.
pub fn describe(device: &Device) -> String {
    let ops = if device.is_cpu() {
        crate::ops::path_name()
    } else {
        "generic"
    };
    let name = match device.location() {
        candle_core::DeviceLocation::Cpu => {
            format!("cpu ({} threads)", rayon::current_num_threads())
        }
        candle_core::DeviceLocation::Cuda { gpu_id } => format!("cuda:{gpu_id}"),
        candle_core::DeviceLocation::Metal { gpu_id } => format!("metal:{gpu_id}"),
    };
    format!("{name}, ops: {ops}")
}

/// Which kernels the compute runs on, for `medmine bench`: on the CPU, the ISA the matrix
/// products take (the `gemm` crate picks its AVX-512 kernels where the CPU has AVX-512F, built
/// with its `x86-v4` feature as here, else AVX2+FMA, else scalar), the ISA of our own
/// vectorised kernels (`ops::fast_math`: AVX2+FMA or the x86-64 baseline), which op path CPU
/// tensors take (`fast`: our kernels; `generic`: candle's ops, `MEDMINE_OPS=generic`) and the
/// threads; e.g. `cpu: gemm avx512f, own kernels avx2+fma, ops fast, 2 threads (rayon)`.
pub fn kernels(device: &Device) -> String {
    match device.location() {
        candle_core::DeviceLocation::Cpu => {
            let isa = cpu_isa();
            format!(
                "cpu: gemm {}, own kernels {}, ops {}, {} threads (rayon){}",
                isa.gemm,
                isa.own,
                crate::ops::path_name(),
                rayon::current_num_threads(),
                isa.extra
            )
        }
        candle_core::DeviceLocation::Cuda { gpu_id } => {
            format!("cuda:{gpu_id}: candle's CUDA kernels (cuBLAS matmuls), ops generic")
        }
        candle_core::DeviceLocation::Metal { gpu_id } => {
            format!("metal:{gpu_id}: candle's Metal kernels, ops generic")
        }
    }
}

/// What the CPU offers the kernels.
pub struct CpuIsa {
    /// The `gemm` kernels: `avx512f`, `avx2+fma`, `fma` or `scalar`.
    pub gemm: &'static str,
    /// Our own vectorised kernels: `avx2+fma` or `baseline`.
    pub own: &'static str,
    /// Other detected features that no kernel uses (`, detected but unused: avx512_bf16`).
    pub extra: String,
}

/// [`CpuIsa`] of this CPU (`std::is_x86_feature_detected`).
pub fn cpu_isa() -> CpuIsa {
    #[cfg(target_arch = "x86_64")]
    {
        let avx512 = is_x86_feature_detected!("avx512f");
        let avx2 = is_x86_feature_detected!("avx2");
        let fma = is_x86_feature_detected!("fma");
        let gemm = match (avx512, avx2, fma) {
            (true, _, _) => "avx512f",
            (false, true, true) => "avx2+fma",
            (false, false, true) => "fma",
            _ => "scalar",
        };
        let unused: Vec<&str> = [
            ("avx512bf16", is_x86_feature_detected!("avx512bf16")),
            ("avx512vnni", is_x86_feature_detected!("avx512vnni")),
        ]
        .into_iter()
        .filter_map(|(n, on)| on.then_some(n))
        .collect();
        CpuIsa {
            gemm,
            own: if avx2 && fma { "avx2+fma" } else { "baseline" },
            extra: if unused.is_empty() {
                String::new()
            } else {
                format!(", detected but unused: {}", unused.join(" "))
            },
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        CpuIsa {
            gemm: if cfg!(target_arch = "aarch64") {
                "neon"
            } else {
                "scalar"
            },
            own: "baseline",
            extra: String::new(),
        }
    }
}

/// Keeps freed tensor memory in the process instead of returning it to the OS.
///
/// glibc maps every allocation over 32 MiB freshly with `mmap` and unmaps it on free, so each
/// new large tensor page-faults its way in (measured: a U-Net++ training step at 128x128,
/// batch 8, base 32 went from 0.86 to 1.37 images/s on a 2-core EPYC with this setting, for
/// 2% more peak memory). Call once at start-up, before threads allocate.
pub fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator parameters; it is called before other threads
    // exist and its failure (return 0) leaves the defaults in place.
    unsafe {
        libc::mallopt(libc::M_MMAP_MAX, 0);
        libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
    }
}

/// Fixes the CPU thread count for the process: unless `RAYON_NUM_THREADS` or
/// `CANDLE_NUM_THREADS` is set, sets `RAYON_NUM_THREADS` to the count candle would choose.
///
/// candle 0.11 looks the count up on every CPU matmul, and without either variable that is
/// `num_cpus::get_physical()`, a fresh parse of `/proc/cpuinfo` each time (perf: ~13% of the
/// vit_t image encoder's time and a visible share of a SAM click on a 2-core VM). The value
/// is the same; it is only computed once. Call at start-up, before other threads exist.
pub fn settle_thread_count() {
    if std::env::var_os("RAYON_NUM_THREADS").is_none()
        && std::env::var_os("CANDLE_NUM_THREADS").is_none()
    {
        let n = candle_core::utils::get_num_threads();
        std::env::set_var("RAYON_NUM_THREADS", n.to_string());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_the_kernels_of_the_cpu() {
        let k = kernels(&Device::Cpu);
        assert!(k.starts_with("cpu: gemm "), "{k}");
        assert!(
            k.contains(&format!("ops {}", crate::ops::path_name())),
            "{k}"
        );
        #[cfg(target_arch = "x86_64")]
        {
            let isa = cpu_isa();
            assert_eq!(isa.gemm == "avx512f", is_x86_feature_detected!("avx512f"));
            assert_eq!(
                isa.own == "avx2+fma",
                is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma")
            );
        }
    }

    #[test]
    fn parses_choices() {
        assert_eq!("auto".parse::<DeviceChoice>().unwrap(), DeviceChoice::Auto);
        assert_eq!(
            "cuda:1".parse::<DeviceChoice>().unwrap(),
            DeviceChoice::Cuda(1)
        );
        assert_eq!(
            "cuda".parse::<DeviceChoice>().unwrap(),
            DeviceChoice::Cuda(0)
        );
        assert!("tpu".parse::<DeviceChoice>().is_err());
        assert!("cuda:x".parse::<DeviceChoice>().is_err());
    }

    #[test]
    fn auto_says_why() {
        let (d, why) = DeviceChoice::Auto.open_explained().unwrap();
        let why = why.expect("auto explains its choice");
        assert!(why.starts_with("auto: "), "{why}");
        if d.is_cpu() && !cfg!(any(feature = "cuda", feature = "metal")) {
            assert!(why.contains("built without GPU support"), "{why}");
        }
        let (_, why) = DeviceChoice::Cpu.open_explained().unwrap();
        assert_eq!(why, None, "an explicit choice needs no reason");
    }

    #[test]
    fn cpu_always_opens() {
        let d = DeviceChoice::Cpu.open().unwrap();
        assert!(describe(&d).starts_with("cpu"));
        let d = DeviceChoice::Auto.open().unwrap();
        assert!(!describe(&d).is_empty());
    }
}
