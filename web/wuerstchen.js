// ComfyUI-Wuerstchen front-end extension: shows, under the latent and Stage B sampler nodes, the
// Stage C latent, Stage B latent and output image sizes for the chosen width/height/compression,
// and warns when a size lies outside what the Stable Cascade models were trained on.
// Loaded by ComfyUI as an ES module from WEB_DIRECTORY ("./web"); it only reads widget values and
// never changes what the graph sends to the server.
import { app } from "../../scripts/app.js";

// ---------------------------------------------------------------------------------------------
// Size rules: the one place that knows the numbers.
// Stage C was trained around 1024x1024 (about one megapixel, 24x24 latents at compression
// 42.67) with multi-aspect buckets; Stage B and A work at a fixed factor of 4 to the pixels.
// ---------------------------------------------------------------------------------------------
export const TRAINED = Object.freeze({
  minSide: 512, //             px; smaller images lose Stage C's composition quality
  maxSide: 2048, //            px; larger ones repeat objects / break composition
  maxAspect: 2, //             long side : short side
  minMegapixels: 0.25, //      in units of 1024*1024 px (512x512 = 0.25)
  maxMegapixels: 4, //         2048x2048 = 4
  minCompression: 32, //       Stage C was trained around 32..42.67 (official 42.67);
  maxCompression: 64, //       beyond this range its latents get too large / too small
});

/** Warnings (strings, empty when fine) for an image of width x height px; compression is the
 *  Stage C compression, or null where it does not apply (a Stage B target size). */
export function sizeWarnings(width, height, compression = null) {
  const t = TRAINED;
  const warnings = [];
  if (!(width > 0 && height > 0)) return [`size ${width}×${height} must be positive`];
  for (const [name, side] of [["width", width], ["height", height]]) {
    if (side < t.minSide || side > t.maxSide) {
      warnings.push(`${name} ${side} outside the trained ${t.minSide}–${t.maxSide} px`);
    }
  }
  const aspect = Math.max(width, height) / Math.min(width, height);
  if (aspect > t.maxAspect) {
    warnings.push(`aspect ratio ${aspect.toFixed(2)}:1 is wider than the trained ${t.maxAspect}:1`);
  }
  const megapixels = (width * height) / (1024 * 1024);
  if (megapixels < t.minMegapixels || megapixels > t.maxMegapixels) {
    warnings.push(`${megapixels.toFixed(2)} MP outside the trained ${t.minMegapixels}–${t.maxMegapixels} MP`);
  }
  if (compression !== null && !(compression >= t.minCompression && compression <= t.maxCompression)) {
    warnings.push(`compression ${compression} outside ${t.minCompression}–${t.maxCompression} (official 42.67)`);
  }
  return warnings;
}

/** Latent and image shapes, as in the official pipeline: Stage C = ceil(px / compression) with
 *  16 channels, Stage B = ceil(px / 4) with 4 channels, the decoded image = 4 x Stage B. */
export function latentSizes(width, height, compression) {
  const stageB = { channels: 4, width: Math.ceil(width / 4), height: Math.ceil(height / 4) };
  return {
    stageC: compression > 0
      ? { channels: 16, width: Math.ceil(width / compression), height: Math.ceil(height / compression) }
      : null,
    stageB,
    output: { width: stageB.width * 4, height: stageB.height * 4 },
  };
}

// ---------------------------------------------------------------------------------------------
// Which nodes get the read-out, and how their text is made.
// ---------------------------------------------------------------------------------------------
const EXTENSION_NAME = "wuerstchen.sizes";
const READOUT_WIDGET = "wuerstchen_sizes";
const EMPTY_LATENT = "WuerstchenEmptyLatent";
const STAGE_B_SAMPLER = "WuerstchenStageBSampler";
const OWN_NODE_PREFIX = "Wuerstchen";
const MAX_UPSTREAM_HOPS = 16;

const LINE_HEIGHT = 15;
const FONT_SIZE = 12;
const INFO_COLOR = "#9aa0a6";
const WARN_COLOR = "#f0a33a";

const wh = (s) => `${s.width}×${s.height}`;

/** The value a widget feeds the node: its own, or a primitive's when the input is linked
 *  (undefined when the linked source is not a simple value node). */
function widgetValue(node, name) {
  const widget = node.widgets?.find((w) => w.name === name);
  if (!widget) return undefined;
  const slot = node.findInputSlot?.(name) ?? -1;
  if (slot < 0 || node.inputs[slot]?.link == null) return widget.value;
  const source = node.getInputNode(slot);
  const value = source?.widgets?.find((w) => w.name === "value") ?? source?.widgets?.[0];
  return typeof value?.value === "number" ? value.value : undefined;
}

/** The Empty Latent node a node's Stage C latent comes from, following the first LATENT input
 *  upstream through our own nodes only (a foreign node, e.g. a latent upscaler, may change the
 *  size, so the trail stops there); null when there is none. */
function upstreamEmptyLatent(node) {
  const seen = new Set();
  let current = node;
  for (let hop = 0; hop < MAX_UPSTREAM_HOPS && current && !seen.has(current.id); hop++) {
    seen.add(current.id);
    if (hop > 0 && current.comfyClass === EMPTY_LATENT) return current;
    if (!String(current.comfyClass ?? "").startsWith(OWN_NODE_PREFIX)) return null;
    const slot = (current.inputs ?? []).findIndex((i) => i.type === "LATENT" && i.link != null);
    current = slot >= 0 ? current.getInputNode(slot) : null;
  }
  return null;
}

/** [{text, warn}] lines for a WuerstchenEmptyLatent node. */
function emptyLatentLines(node) {
  const width = widgetValue(node, "width");
  const height = widgetValue(node, "height");
  const compression = widgetValue(node, "compression");
  if ([width, height, compression].some((v) => typeof v !== "number")) {
    return [{ text: "sizes known at run time (linked inputs)", warn: false }];
  }
  const sizes = latentSizes(width, height, compression);
  const lines = [
    { text: "sizes as width × height", warn: false },
    sizes.stageC
      ? { text: `Stage C latent ${wh(sizes.stageC)}, ${sizes.stageC.channels} ch`, warn: false }
      : { text: "Stage C latent: compression must be > 0", warn: true },
    { text: `Stage B latent ${wh(sizes.stageB)}, ${sizes.stageB.channels} ch`, warn: false },
    { text: `Output image ${wh(sizes.output)} px`, warn: false },
  ];
  if (sizes.output.width !== width || sizes.output.height !== height) {
    lines.push({ text: "(output rounded up to a multiple of 4)", warn: false });
  }
  return lines.concat(sizeWarnings(width, height, compression).map((text) => ({ text: `⚠ ${text}`, warn: true })));
}

/** [{text, warn}] lines for a WuerstchenStageBSampler node: its target size, where a 0 width or
 *  height is taken from the Empty Latent that the Stage C latent comes from. */
function stageBSamplerLines(node) {
  const source = upstreamEmptyLatent(node);
  const fromC = source
    ? { width: widgetValue(source, "width"), height: widgetValue(source, "height"), compression: widgetValue(source, "compression") }
    : null;
  const pick = (name) => {
    const own = widgetValue(node, name);
    if (typeof own === "number" && own > 0) return { value: own, own: true };
    return { value: fromC?.[name], own: false };
  };
  const w = pick("width");
  const h = pick("height");
  if (typeof w.value !== "number" || typeof h.value !== "number") {
    return [{ text: "target: from the Stage C latent (known at run time)", warn: false }];
  }
  const sizes = latentSizes(w.value, h.value, null);
  const origin = w.own && h.own ? "set here" : w.own || h.own ? "partly from Stage C" : "from Stage C";
  const lines = [
    { text: `target ${w.value}×${h.value} (${origin})`, warn: false },
    { text: `Stage B latent ${wh(sizes.stageB)}, ${sizes.stageB.channels} ch`, warn: false },
    { text: `Output image ${wh(sizes.output)} px`, warn: false },
  ];
  const warnings = sizeWarnings(w.value, h.value, null);
  if (fromC && typeof fromC.compression === "number" && fromC.compression > 0 && (w.own || h.own)) {
    const c = latentSizes(fromC.width, fromC.height, fromC.compression).stageC;
    const stretch = (w.value / h.value) / (c.width / c.height);
    if (Math.abs(Math.log(stretch)) > Math.log(1.1)) {
      warnings.push(`aspect differs from the Stage C latent ${wh(c)}: the image is stretched`);
    }
  }
  return lines.concat(warnings.map((text) => ({ text: `⚠ ${text}`, warn: true })));
}

const LINE_MAKERS = { [EMPTY_LATENT]: emptyLatentLines, [STAGE_B_SAMPLER]: stageBSamplerLines };

// ---------------------------------------------------------------------------------------------
// Drawing: a read-only canvas widget appended to the node (not saved, not sent to the server).
// ---------------------------------------------------------------------------------------------
const MEASURE = document.createElement("canvas").getContext("2d");
const MARGIN = 15;

function font() {
  return `${FONT_SIZE}px ${globalThis.LiteGraph?.NODE_FONT || "Arial"}`;
}

/** Breaks the lines into rows that fit maxWidth (words are kept whole). */
function wrapLines(ctx, lines, maxWidth) {
  ctx.font = font();
  const rows = [];
  for (const { text, warn } of lines) {
    let row = "";
    for (const word of text.split(" ")) {
      const candidate = row ? `${row} ${word}` : word;
      if (row && ctx.measureText(candidate).width > maxWidth) {
        rows.push({ text: row, warn });
        row = word;
      } else {
        row = candidate;
      }
    }
    rows.push({ text: row, warn });
  }
  return rows;
}

/** The read-out of a node as [{text, warn}] lines (unwrapped); [] for nodes it does not handle. */
export function readoutLines(node) {
  try {
    return LINE_MAKERS[node.comfyClass]?.(node) ?? [];
  } catch (error) {
    return [{ text: `size read-out failed: ${error.message}`, warn: true }];
  }
}

function readoutRows(node, ctx, width) {
  return wrapLines(ctx, readoutLines(node), Math.max(40, (width ?? node.size[0]) - 2 * MARGIN));
}

function addReadout(node) {
  if (node.widgets?.some((w) => w.name === READOUT_WIDGET)) return;
  const widget = {
    name: READOUT_WIDGET,
    type: "wuerstchen.readout",
    value: "",
    serialize: false, //            not in the saved workflow's widgets_values
    options: { serialize: false }, // not in the prompt sent to the server
    computeSize(width) {
      const rows = readoutRows(node, MEASURE, width);
      return [width ?? node.size[0], rows.length * LINE_HEIGHT + 6];
    },
    draw(ctx, drawnNode, width, y) {
      const rows = readoutRows(drawnNode, ctx, width);
      ctx.save();
      ctx.font = font();
      ctx.textAlign = "left";
      ctx.textBaseline = "middle";
      rows.forEach((row, i) => {
        ctx.fillStyle = row.warn ? WARN_COLOR : INFO_COLOR;
        ctx.fillText(row.text, MARGIN, y + 3 + LINE_HEIGHT * (i + 0.5));
      });
      ctx.restore();
    },
  };
  node.addCustomWidget(widget);
  node.expandToFitContent?.();
}

// ---------------------------------------------------------------------------------------------
// Registration (once, even if the module were loaded twice under two URLs).
// ---------------------------------------------------------------------------------------------
if (!app.extensions?.some((e) => e.name === EXTENSION_NAME)) {
  app.registerExtension({
    name: EXTENSION_NAME,
    setup() {
      window.__wuerstchen_sizes_loaded = true;
    },
    nodeCreated(node) {
      if (node.comfyClass in LINE_MAKERS) addReadout(node);
    },
  });
}
