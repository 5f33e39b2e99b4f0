// The canvas: the image and four mask layers composited in one pass.
// Keep in sync with `OverlayUniform` in src/gui/overlay.rs.

struct Overlay {
    // image pixel = uv * image_from_uv.xy + image_from_uv.zw  (uv in [0, 1] over the canvas rect)
    image_from_uv: vec4<f32>,
    // (width, height) of the image in pixels
    image_size: vec2<f32>,
    // window/level of grayscale images: (level, width) in [0, 1] intensity units
    window: vec2<f32>,
    // x: 1 = grayscale image (16-bit in r/g, apply window/level); y: error map against ground truth:
    // 0 = off, else (layer index + 1) compared with layer 0; z: 1 = swipe compare; w: unused
    flags: vec4<u32>,
    // x: swipe position in uv; y: image pixels per screen pixel (outline thickness); zw: unused
    params: vec4<f32>,
    // per layer: rgb colour and opacity
    colors: array<vec4<f32>, 4>,
    // per layer: 0 hidden, 1 fill, 2 outline, 3 colour map (probabilities)
    modes: vec4<u32>,
    // per layer in swipe compare: 0 both sides, 1 left only, 2 right only
    sides: vec4<u32>,
};

@group(0) @binding(0) var image_tex: texture_2d<f32>;
@group(0) @binding(1) var image_sampler: sampler;
@group(0) @binding(2) var layer0: texture_2d<f32>;
@group(0) @binding(3) var layer1: texture_2d<f32>;
@group(0) @binding(4) var layer2: texture_2d<f32>;
@group(0) @binding(5) var layer3: texture_2d<f32>;
@group(1) @binding(0) var<uniform> u: Overlay;

struct VertexOut {
    @builtin(position) position: vec4<f32>,
    @location(0) uv: vec2<f32>,
};

// A quad over the whole callback viewport (a 4-vertex triangle strip).
@vertex
fn vs_main(@builtin(vertex_index) i: u32) -> VertexOut {
    let uv = vec2<f32>(f32(i & 1u), f32((i >> 1u) & 1u));
    var out: VertexOut;
    out.position = vec4<f32>(uv.x * 2.0 - 1.0, 1.0 - uv.y * 2.0, 0.0, 1.0);
    out.uv = uv;
    return out;
}

fn layer_value(layer: u32, p: vec2<i32>) -> f32 {
    let q = clamp(p, vec2<i32>(0, 0), vec2<i32>(u.image_size) - vec2<i32>(1, 1));
    switch layer {
        case 0u: { return textureLoad(layer0, q, 0).r; }
        case 1u: { return textureLoad(layer1, q, 0).r; }
        case 2u: { return textureLoad(layer2, q, 0).r; }
        default: { return textureLoad(layer3, q, 0).r; }
    }
}

// A compact approximation of the viridis colour map.
fn viridis(t: f32) -> vec3<f32> {
    let c0 = vec3<f32>(0.267, 0.005, 0.329);
    let c1 = vec3<f32>(0.128, 0.567, 0.551);
    let c2 = vec3<f32>(0.993, 0.906, 0.144);
    if t < 0.5 {
        return mix(c0, c1, t * 2.0);
    }
    return mix(c1, c2, (t - 0.5) * 2.0);
}

// Whether a foreground pixel touches background within `r` image pixels (4 directions).
fn is_edge(layer: u32, p: vec2<i32>, r: i32) -> bool {
    let inside = layer_value(layer, p) > 0.5;
    if !inside {
        return false;
    }
    let size = vec2<i32>(u.image_size);
    let offsets = array<vec2<i32>, 4>(vec2<i32>(r, 0), vec2<i32>(-r, 0), vec2<i32>(0, r), vec2<i32>(0, -r));
    for (var k = 0; k < 4; k++) {
        let q = p + offsets[k];
        if q.x < 0 || q.y < 0 || q.x >= size.x || q.y >= size.y {
            return true;
        }
        if layer_value(layer, q) <= 0.5 {
            return true;
        }
    }
    return false;
}

fn over(dst: vec3<f32>, src: vec3<f32>, alpha: f32) -> vec3<f32> {
    return mix(dst, src, clamp(alpha, 0.0, 1.0));
}

@fragment
fn fs_main(in: VertexOut) -> @location(0) vec4<f32> {
    let point_in_image = in.uv * u.image_from_uv.xy + u.image_from_uv.zw;
    if point_in_image.x < 0.0 || point_in_image.y < 0.0 || point_in_image.x >= u.image_size.x || point_in_image.y >= u.image_size.y {
        return vec4<f32>(0.08, 0.08, 0.09, 1.0);
    }
    var rgb = textureSampleLevel(image_tex, image_sampler, point_in_image / u.image_size, 0.0).rgb;
    if u.flags.x == 1u {
        // grayscale images carry 16 bits: high byte in r, low byte in g (see `image_rgba` in
        // src/gui/overlay.rs); 8-bit gray has r == g and reads r exactly
        let gray = (rgb.r * 256.0 + rgb.g) / 257.0;
        let lo = u.window.x - 0.5 * u.window.y;
        let v = clamp((gray - lo) / max(u.window.y, 1e-4), 0.0, 1.0);
        rgb = vec3<f32>(v, v, v);
    }
    let p = vec2<i32>(floor(point_in_image));
    let right_side = u.flags.z == 1u && in.uv.x >= u.params.x;
    let r = max(i32(ceil(u.params.y)), 1);

    if u.flags.y > 0u {
        // error map: layer 0 (ground truth) against another layer
        let truth = layer_value(0u, p) > 0.5;
        let pred = layer_value(u.flags.y - 1u, p) > 0.5;
        if pred && !truth {
            rgb = over(rgb, vec3<f32>(1.0, 0.15, 0.1), 0.6); // false positive
        } else if truth && !pred {
            rgb = over(rgb, vec3<f32>(0.1, 0.45, 1.0), 0.6); // false negative
        } else if truth && pred {
            rgb = over(rgb, vec3<f32>(0.2, 0.9, 0.3), 0.15); // agreement
        }
    } else {
        for (var layer = 0u; layer < 4u; layer++) {
            let mode = u.modes[layer];
            let side = u.sides[layer];
            if mode == 0u || (u.flags.z == 1u && ((side == 1u && right_side) || (side == 2u && !right_side))) {
                continue;
            }
            let c = u.colors[layer];
            let v = layer_value(layer, p);
            if mode == 1u {
                if v > 0.5 {
                    rgb = over(rgb, c.rgb, c.a);
                }
            } else if mode == 2u {
                if is_edge(layer, p, r) {
                    rgb = over(rgb, c.rgb, max(c.a, 0.9));
                }
            } else {
                rgb = over(rgb, viridis(v), c.a * smoothstep(0.02, 0.2, v));
            }
        }
    }
    if u.flags.z == 1u && abs(in.uv.x - u.params.x) < 0.002 {
        rgb = vec3<f32>(1.0, 1.0, 1.0);
    }
    return vec4<f32>(rgb, 1.0);
}
