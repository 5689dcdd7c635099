//! The embedded eBPF objects and loading them with aya.

use aya::Ebpf;
use thiserror::Error;

#[derive(Debug, Error)]
pub enum EbpfError {
    #[error("loading eBPF object `{object}`: {source}")]
    Load {
        object: &'static str,
        #[source]
        source: aya::EbpfError,
    },
    #[error("eBPF program `{program}` in `{object}` was rejected: {detail}")]
    Program {
        object: &'static str,
        program: String,
        detail: String,
    },
}

pub struct EmbeddedObject {
    pub name: &'static str,
    pub bytes: &'static [u8],
}

pub const OBJECTS: &[EmbeddedObject] = &[
    EmbeddedObject {
        name: "redirect",
        bytes: weir_redirect_ebpf::OBJECT,
    },
    EmbeddedObject {
        name: "sockmap",
        bytes: weir_sockmap_ebpf::OBJECT,
    },
];

/// Loads an embedded object and every program in it into the kernel (the
/// verifier runs), without attaching anything. Returns the program names.
pub fn load_and_verify(obj: &EmbeddedObject) -> Result<Vec<String>, EbpfError> {
    let mut ebpf = Ebpf::load(obj.bytes).map_err(|source| EbpfError::Load {
        object: obj.name,
        source,
    })?;
    let names: Vec<String> = ebpf.programs().map(|(n, _)| n.to_string()).collect();
    for name in &names {
        let prog = ebpf.program_mut(name).ok_or_else(|| EbpfError::Program {
            object: obj.name,
            program: name.clone(),
            detail: "missing after load".into(),
        })?;
        let res = match prog {
            aya::programs::Program::SchedClassifier(p) => p.load(),
            aya::programs::Program::SockOps(p) => p.load(),
            aya::programs::Program::SkMsg(p) => p.load(),
            aya::programs::Program::SkLookup(p) => p.load(),
            other => {
                return Err(EbpfError::Program {
                    object: obj.name,
                    program: name.clone(),
                    detail: format!("unexpected program type {:?}", other.prog_type()),
                });
            }
        };
        res.map_err(|e| EbpfError::Program {
            object: obj.name,
            program: name.clone(),
            // The verifier log is part of the error's Display for aya's LoadError.
            detail: format!("{e:#}"),
        })?;
    }
    Ok(names)
}
