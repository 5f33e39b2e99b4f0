//! The canvas renderer: an `egui_wgpu` paint callback that draws the image and four mask layers
//! in one pass with `shaders/overlay.wgsl`. Textures live in the renderer's callback resources
//! and are uploaded only when their version changes; several canvases (compare mode) share them
//! and differ only in their uniform.
use std::collections::HashMap;
use std::sync::Arc;

use egui_wgpu::wgpu;
use egui_wgpu::wgpu::util::DeviceExt;

/// WGSL source of the canvas shader.
pub const OVERLAY_WGSL: &str = include_str!("../../shaders/overlay.wgsl");

/// Layer slots, in the order of the shader's `layer0..layer3`.
pub const LAYER_GT: usize = 0;
pub const LAYER_PROB: usize = 1;
pub const LAYER_PSEUDO: usize = 2;
pub const LAYER_EDIT: usize = 3;
pub const LAYER_NAMES: [&str; 4] = [
    "Ground truth",
    "U-Net++ probability",
    "Pseudo-label",
    "Edit",
];

/// The shader's uniform block. Keep in sync with `struct Overlay` in shaders/overlay.wgsl.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, bytemuck::Pod, bytemuck::Zeroable)]
pub struct OverlayUniform {
    /// image pixel = uv * xy + zw (uv in [0, 1] over the canvas rect)
    pub image_from_uv: [f32; 4],
    pub image_size: [f32; 2],
    /// (level, width) of the grayscale window, in [0, 1] intensity units
    pub window: [f32; 2],
    /// x grayscale, y error map (compared layer + 1, 0 off), z swipe compare, w unused
    pub flags: [u32; 4],
    /// x swipe position in uv, y image pixels per screen pixel
    pub params: [f32; 4],
    /// per layer rgb + opacity
    pub colors: [[f32; 4]; 4],
    /// per layer: 0 hidden, 1 fill, 2 outline, 3 colour map
    pub modes: [u32; 4],
    /// per layer in swipe compare: 0 both sides, 1 left, 2 right
    pub sides: [u32; 4],
}

/// The image texture's RGBA8 bytes. Colour images: their 8-bit channels. Grayscale images:
/// 16 bits per pixel, the high byte in R (and B) and the low byte in G, which the shader reads
/// as `(r * 256 + g) / 257` (keep in sync with shaders/overlay.wgsl), so that a narrow window
/// on a 12- or 16-bit image (DICOM) keeps its gray steps; an 8-bit gray value `k` is stored as
/// `R = G = B = k` and reads exactly `k / 255`. Linear filtering commutes with that sum, so
/// filtered samples stay exact.
pub fn image_rgba(img: &crate::data::ImageF32, grayscale: bool) -> Vec<u8> {
    let n = img.width * img.height;
    let (r, g, b) = (img.channel(0), img.channel(1), img.channel(2));
    let mut rgba = Vec::with_capacity(n * 4);
    if grayscale {
        for &v in r {
            let q = (v.clamp(0., 1.) * 65535.).round() as u16;
            let [hi, lo] = q.to_be_bytes();
            rgba.extend_from_slice(&[hi, lo, hi, 255]);
        }
    } else {
        let q = |v: f32| (v.clamp(0., 1.) * 255.).round() as u8;
        for i in 0..n {
            rgba.extend_from_slice(&[q(r[i]), q(g[i]), q(b[i]), 255]);
        }
    }
    rgba
}

/// Pixels of the current image and its layers, shared with the UI through `Arc`s so that a
/// frame costs no copy; `version` changes whenever any of them changes.
#[derive(Clone, Default)]
pub struct CanvasData {
    pub width: u32,
    pub height: u32,
    /// RGBA8, `width * height * 4`.
    pub rgba: Arc<Vec<u8>>,
    /// One byte per pixel each (0..=255); `None` uploads an empty layer.
    pub layers: [Option<Arc<Vec<u8>>>; 4],
    /// Set by the owner to a fresh [`next_version`] on every change of `rgba` or of a layer
    /// (per slot). The textures are cached per canvas, across images and projects: a version
    /// is never given out twice, so equal versions always mean equal pixels.
    pub versions: [u64; 5],
}

/// A version number that no other `CanvasData` change in this process has had.
pub fn next_version() -> u64 {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
    NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
}

struct Textures {
    size: (u32, u32),
    image: wgpu::Texture,
    layers: [wgpu::Texture; 4],
    bind_group: wgpu::BindGroup,
    uploaded: [u64; 5],
}

/// Pipeline and textures, stored in `egui_wgpu::Renderer::callback_resources`.
pub struct OverlayResources {
    pipeline: wgpu::RenderPipeline,
    textures_layout: wgpu::BindGroupLayout,
    uniform_layout: wgpu::BindGroupLayout,
    sampler: wgpu::Sampler,
    textures: Option<Textures>,
    /// One uniform buffer per canvas id.
    uniforms: HashMap<u64, (wgpu::Buffer, wgpu::BindGroup)>,
}

/// Registers the pipeline with the renderer (once, when the app starts).
pub fn install(render_state: &egui_wgpu::RenderState) {
    let res = OverlayResources::new(&render_state.device, render_state.target_format);
    render_state.renderer.write().callback_resources.insert(res);
}

impl OverlayResources {
    pub fn new(device: &wgpu::Device, format: wgpu::TextureFormat) -> Self {
        let shader = device.create_shader_module(wgpu::ShaderModuleDescriptor {
            label: Some("medmine overlay"),
            source: wgpu::ShaderSource::Wgsl(OVERLAY_WGSL.into()),
        });
        let tex_entry = |binding: u32, filterable: bool| wgpu::BindGroupLayoutEntry {
            binding,
            visibility: wgpu::ShaderStages::FRAGMENT,
            ty: wgpu::BindingType::Texture {
                sample_type: wgpu::TextureSampleType::Float { filterable },
                view_dimension: wgpu::TextureViewDimension::D2,
                multisampled: false,
            },
            count: None,
        };
        let textures_layout = device.create_bind_group_layout(&wgpu::BindGroupLayoutDescriptor {
            label: Some("medmine overlay textures"),
            entries: &[
                tex_entry(0, true),
                wgpu::BindGroupLayoutEntry {
                    binding: 1,
                    visibility: wgpu::ShaderStages::FRAGMENT,
                    ty: wgpu::BindingType::Sampler(wgpu::SamplerBindingType::Filtering),
                    count: None,
                },
                tex_entry(2, false),
                tex_entry(3, false),
                tex_entry(4, false),
                tex_entry(5, false),
            ],
        });
        let uniform_layout = device.create_bind_group_layout(&wgpu::BindGroupLayoutDescriptor {
            label: Some("medmine overlay uniform"),
            entries: &[wgpu::BindGroupLayoutEntry {
                binding: 0,
                visibility: wgpu::ShaderStages::FRAGMENT,
                ty: wgpu::BindingType::Buffer {
                    ty: wgpu::BufferBindingType::Uniform,
                    has_dynamic_offset: false,
                    min_binding_size: None,
                },
                count: None,
            }],
        });
        let layout = device.create_pipeline_layout(&wgpu::PipelineLayoutDescriptor {
            label: Some("medmine overlay"),
            bind_group_layouts: &[Some(&textures_layout), Some(&uniform_layout)],
            immediate_size: 0,
        });
        let pipeline = device.create_render_pipeline(&wgpu::RenderPipelineDescriptor {
            label: Some("medmine overlay"),
            layout: Some(&layout),
            vertex: wgpu::VertexState {
                module: &shader,
                entry_point: Some("vs_main"),
                compilation_options: Default::default(),
                buffers: &[],
            },
            fragment: Some(wgpu::FragmentState {
                module: &shader,
                entry_point: Some("fs_main"),
                compilation_options: Default::default(),
                targets: &[Some(wgpu::ColorTargetState {
                    format,
                    blend: None,
                    write_mask: wgpu::ColorWrites::ALL,
                })],
            }),
            primitive: wgpu::PrimitiveState {
                topology: wgpu::PrimitiveTopology::TriangleStrip,
                ..Default::default()
            },
            depth_stencil: None,
            multisample: wgpu::MultisampleState::default(),
            multiview_mask: None,
            cache: None,
        });
        let sampler = device.create_sampler(&wgpu::SamplerDescriptor {
            label: Some("medmine overlay image"),
            mag_filter: wgpu::FilterMode::Nearest,
            min_filter: wgpu::FilterMode::Linear,
            ..Default::default()
        });
        Self {
            pipeline,
            textures_layout,
            uniform_layout,
            sampler,
            textures: None,
            uniforms: HashMap::new(),
        }
    }

    fn create_textures(&self, device: &wgpu::Device, w: u32, h: u32) -> Textures {
        let size = wgpu::Extent3d {
            width: w.max(1),
            height: h.max(1),
            depth_or_array_layers: 1,
        };
        let make = |label: &str, format: wgpu::TextureFormat| {
            device.create_texture(&wgpu::TextureDescriptor {
                label: Some(label),
                size,
                mip_level_count: 1,
                sample_count: 1,
                dimension: wgpu::TextureDimension::D2,
                format,
                usage: wgpu::TextureUsages::TEXTURE_BINDING | wgpu::TextureUsages::COPY_DST,
                view_formats: &[],
            })
        };
        let image = make("medmine image", wgpu::TextureFormat::Rgba8Unorm);
        let layers = [0, 1, 2, 3].map(|_| make("medmine layer", wgpu::TextureFormat::R8Unorm));
        let view = |t: &wgpu::Texture| t.create_view(&Default::default());
        let views = [
            view(&image),
            view(&layers[0]),
            view(&layers[1]),
            view(&layers[2]),
            view(&layers[3]),
        ];
        let bind_group = device.create_bind_group(&wgpu::BindGroupDescriptor {
            label: Some("medmine overlay textures"),
            layout: &self.textures_layout,
            entries: &[
                wgpu::BindGroupEntry {
                    binding: 0,
                    resource: wgpu::BindingResource::TextureView(&views[0]),
                },
                wgpu::BindGroupEntry {
                    binding: 1,
                    resource: wgpu::BindingResource::Sampler(&self.sampler),
                },
                wgpu::BindGroupEntry {
                    binding: 2,
                    resource: wgpu::BindingResource::TextureView(&views[1]),
                },
                wgpu::BindGroupEntry {
                    binding: 3,
                    resource: wgpu::BindingResource::TextureView(&views[2]),
                },
                wgpu::BindGroupEntry {
                    binding: 4,
                    resource: wgpu::BindingResource::TextureView(&views[3]),
                },
                wgpu::BindGroupEntry {
                    binding: 5,
                    resource: wgpu::BindingResource::TextureView(&views[4]),
                },
            ],
        });
        Textures {
            size: (w, h),
            image,
            layers,
            bind_group,
            uploaded: [u64::MAX; 5],
        }
    }

    /// Uploads what changed since the last frame; returns the number of textures written.
    fn upload(&mut self, device: &wgpu::Device, queue: &wgpu::Queue, data: &CanvasData) -> usize {
        let (w, h) = (data.width, data.height);
        if self.textures.as_ref().map(|t| t.size) != Some((w, h)) {
            self.textures = Some(self.create_textures(device, w, h));
        }
        let tex = self.textures.as_mut().expect("textures just created");
        let extent = wgpu::Extent3d {
            width: w.max(1),
            height: h.max(1),
            depth_or_array_layers: 1,
        };
        let n = (w as usize) * (h as usize);
        let mut written = 0;
        let write = |texture: &wgpu::Texture, bytes: &[u8], bpp: u32| {
            queue.write_texture(
                wgpu::TexelCopyTextureInfo {
                    texture,
                    mip_level: 0,
                    origin: wgpu::Origin3d::ZERO,
                    aspect: wgpu::TextureAspect::All,
                },
                bytes,
                wgpu::TexelCopyBufferLayout {
                    offset: 0,
                    bytes_per_row: Some(w.max(1) * bpp),
                    rows_per_image: Some(h.max(1)),
                },
                extent,
            );
        };
        if tex.uploaded[0] != data.versions[0] && data.rgba.len() == n * 4 && n > 0 {
            write(&tex.image, &data.rgba, 4);
            tex.uploaded[0] = data.versions[0];
            written += 1;
        }
        for i in 0..4 {
            if tex.uploaded[i + 1] == data.versions[i + 1] {
                continue;
            }
            let zeros;
            let bytes: &[u8] = match &data.layers[i] {
                Some(l) if l.len() == n => l,
                _ => {
                    zeros = vec![0u8; n.max(1)];
                    &zeros
                }
            };
            write(&tex.layers[i], bytes, 1);
            tex.uploaded[i + 1] = data.versions[i + 1];
            written += 1;
        }
        written
    }
}

/// One canvas draw: which canvas (its uniform buffer), its uniform, and the shared data.
pub struct OverlayCallback {
    pub canvas_id: u64,
    pub uniform: OverlayUniform,
    pub data: CanvasData,
}

impl egui_wgpu::CallbackTrait for OverlayCallback {
    fn prepare(
        &self,
        device: &wgpu::Device,
        queue: &wgpu::Queue,
        _screen: &egui_wgpu::ScreenDescriptor,
        _encoder: &mut wgpu::CommandEncoder,
        resources: &mut egui_wgpu::CallbackResources,
    ) -> Vec<wgpu::CommandBuffer> {
        let Some(res) = resources.get_mut::<OverlayResources>() else {
            return Vec::new();
        };
        res.upload(device, queue, &self.data);
        let bytes = bytemuck::bytes_of(&self.uniform);
        if let Some((buf, _)) = res.uniforms.get(&self.canvas_id) {
            queue.write_buffer(buf, 0, bytes);
        } else {
            let buf = device.create_buffer_init(&wgpu::util::BufferInitDescriptor {
                label: Some("medmine overlay uniform"),
                contents: bytes,
                usage: wgpu::BufferUsages::UNIFORM | wgpu::BufferUsages::COPY_DST,
            });
            let bg = device.create_bind_group(&wgpu::BindGroupDescriptor {
                label: Some("medmine overlay uniform"),
                layout: &res.uniform_layout,
                entries: &[wgpu::BindGroupEntry {
                    binding: 0,
                    resource: buf.as_entire_binding(),
                }],
            });
            res.uniforms.insert(self.canvas_id, (buf, bg));
        }
        Vec::new()
    }

    fn paint(
        &self,
        _info: egui::PaintCallbackInfo,
        pass: &mut wgpu::RenderPass<'static>,
        resources: &egui_wgpu::CallbackResources,
    ) {
        let Some(res) = resources.get::<OverlayResources>() else {
            return;
        };
        let (Some(tex), Some((_, uniform))) = (&res.textures, res.uniforms.get(&self.canvas_id))
        else {
            return;
        };
        pass.set_pipeline(&res.pipeline);
        pass.set_bind_group(0, &tex.bind_group, &[]);
        pass.set_bind_group(1, uniform, &[]);
        pass.draw(0..4, 0..1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uniform_layout_matches_the_wgsl_struct() {
        // 4 vec4 (incl. the two vec2) + array of 4 vec4 + 2 vec4 = 10 * 16 bytes
        assert_eq!(std::mem::size_of::<OverlayUniform>(), 10 * 16);
        let module = naga::front::wgsl::parse_str(OVERLAY_WGSL).expect("overlay.wgsl parses");
        let ty = module
            .types
            .iter()
            .find(|(_, t)| t.name.as_deref() == Some("Overlay"))
            .map(|(_, t)| t.inner.clone())
            .expect("struct Overlay");
        let naga::TypeInner::Struct { span, .. } = ty else {
            panic!("Overlay is not a struct")
        };
        assert_eq!(span as usize, std::mem::size_of::<OverlayUniform>());
    }

    #[test]
    fn gray_images_keep_16_bits_and_8_bit_gray_reads_exactly() {
        let read = |px: &[u8]| (f32::from(px[0]) * 256.0 + f32::from(px[1])) / 257.0 / 255.0;
        // 8-bit gray: R = G = B = k, read back as k / 255
        let img = crate::data::ImageF32 {
            width: 3,
            height: 1,
            data: [0.0, 128.0 / 255.0, 1.0].repeat(3),
        };
        let rgba = image_rgba(&img, true);
        assert_eq!(
            rgba,
            vec![0, 0, 0, 255, 128, 128, 128, 255, 255, 255, 255, 255]
        );
        for (px, k) in rgba.chunks(4).zip([0.0, 128.0, 255.0]) {
            assert!((read(px) - k / 255.0).abs() < 1e-6);
        }
        // 12-bit steps survive (an 8-bit texture would merge 16 of them into one level)
        let v: Vec<f32> = (0..16).map(|i| (2000.0 + i as f32) / 4095.0).collect();
        let img = crate::data::ImageF32 {
            width: 16,
            height: 1,
            data: v.repeat(3),
        };
        let rgba = image_rgba(&img, true);
        for (px, v) in rgba.chunks(4).zip(&v) {
            assert!((read(px) - v).abs() < 1.0 / 65535.0, "{px:?} {v}");
        }
        let distinct: std::collections::HashSet<_> = rgba.chunks(4).map(|p| (p[0], p[1])).collect();
        assert_eq!(distinct.len(), 16);
        // colour: plain 8-bit channels
        let img = crate::data::ImageF32 {
            width: 1,
            height: 1,
            data: vec![1.0, 0.5, 0.0],
        };
        assert_eq!(image_rgba(&img, false), vec![255, 128, 0, 255]);
    }
}
