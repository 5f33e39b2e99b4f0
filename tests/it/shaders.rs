//! Every WGSL shader in `shaders/` parses and validates with naga (the same front end wgpu uses).
use std::path::Path;

#[test]
fn every_shader_validates() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("shaders");
    let mut n = 0;
    for entry in std::fs::read_dir(&dir).expect("shaders/") {
        let path = entry.unwrap().path();
        if path.extension().and_then(|e| e.to_str()) != Some("wgsl") {
            continue;
        }
        let src = std::fs::read_to_string(&path).unwrap();
        let module = naga::front::wgsl::parse_str(&src)
            .unwrap_or_else(|e| panic!("{}: {}", path.display(), e.emit_to_string(&src)));
        naga::valid::Validator::new(
            naga::valid::ValidationFlags::all(),
            naga::valid::Capabilities::default(),
        )
        .validate(&module)
        .unwrap_or_else(|e| panic!("{}: {}", path.display(), e.emit_to_string(&src)));
        assert!(
            module.entry_points.len() >= 2,
            "{}: expected vertex and fragment entry points",
            path.display()
        );
        n += 1;
    }
    assert!(n >= 1, "no shader found in {}", dir.display());
}

#[test]
fn a_broken_shader_is_rejected() {
    // guards the test above against a validator that accepts anything
    let src = "@fragment fn fs() -> @location(0) vec4<f32> { return vec3<f32>(1.0); }";
    let module = naga::front::wgsl::parse_str(src);
    let valid = module.ok().map(|m| {
        naga::valid::Validator::new(
            naga::valid::ValidationFlags::all(),
            naga::valid::Capabilities::default(),
        )
        .validate(&m)
        .is_ok()
    });
    assert_ne!(valid, Some(true));
}
