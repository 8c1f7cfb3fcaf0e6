// Open a study in OHIF v3 in headless Chromium, open the SR and the heatmap SC, and report
// what is visible: the SR's text lines and statistics of the SC's canvas pixels.
//
//   node web/ohif_check.mjs --url http://127.0.0.1:8043 --study <StudyInstanceUID> \
//        --sr "<SR series description>" --sc "<SC series description>" --out <folder> \
//        [--chromium /usr/bin/chromium] [--timeout 90000]
//
// Prints one JSON object on stdout (the last line) and writes screenshots under --out:
//   study.png (after load), sr.png (SR opened), sc.png (SC opened).
// Exit status 0 when the pages could be driven (the caller judges the result), 1 otherwise.

import fs from 'node:fs';
import path from 'node:path';
import puppeteer from 'puppeteer-core';

function parseArgs(argv) {
  const args = { chromium: '/usr/bin/chromium', timeout: 90000 };
  for (let i = 0; i < argv.length; i += 2) {
    const key = argv[i].replace(/^--/, '');
    args[key] = argv[i + 1];
  }
  for (const key of ['url', 'study', 'sr', 'sc', 'out']) {
    if (!args[key]) throw new Error(`missing --${key}`);
  }
  args.timeout = Number(args.timeout);
  return args;
}

const sleep = ms => new Promise(resolve => setTimeout(resolve, ms));

// Double-click the study-browser thumbnail whose series description is `description`.
async function openSeries(page, description, timeout) {
  const handle = await page.waitForFunction(
    text => {
      // Thumbnails (images) and list items (SR) both show the series description.
      const leaves = [...document.querySelectorAll('div, span')].filter(
        el => el.children.length === 0 && el.textContent.trim().startsWith(text)
      );
      const label = leaves[0];
      if (!label) return null;
      let node = label;
      // The thumbnail is the nearest ancestor that reacts to double-clicks (it is draggable).
      while (node && !(node.getAttribute && node.getAttribute('draggable') === 'true')) {
        node = node.parentElement;
      }
      return node || label;
    },
    { timeout, polling: 500 },
    description
  );
  const element = handle.asElement();
  await element.scrollIntoView();
  await element.click({ count: 2 });
}

// OHIF 3.x greets a first visit with a guided tour over the viewport; skip it.
async function skipTour(page) {
  const found = await page
    .waitForFunction(
      () => [...document.querySelectorAll('button, a')].find(el => el.textContent.trim() === 'Skip all'),
      { timeout: 10000, polling: 250 }
    )
    .catch(() => null);
  if (found) {
    await found.asElement().click();
    await sleep(300);
  }
}

// Text drawn by the SR display tool (SVG) plus the page's visible text.
async function visibleText(page) {
  return page.evaluate(() => {
    const svg = [...document.querySelectorAll('svg text, svg tspan')].map(t => t.textContent);
    return { svg: [...new Set(svg)], body: document.body.innerText };
  });
}

// Pixel statistics of the first viewport's 2D canvas (Cornerstone3D copies each rendered
// frame from its WebGL context into these on-screen canvases).
async function canvasStats(page) {
  return page.evaluate(() => {
    const canvas = document.querySelector('[data-cy="viewport-pane"] canvas.cornerstone-canvas')
      || document.querySelector('canvas.cornerstone-canvas');
    if (!canvas) return null;
    const ctx = canvas.getContext('2d');
    const { width, height } = canvas;
    const data = ctx.getImageData(0, 0, width, height).data;
    let lit = 0;
    let coloured = 0;
    let sum = 0;
    const pixels = width * height;
    for (let i = 0; i < data.length; i += 4) {
      const [r, g, b] = [data[i], data[i + 1], data[i + 2]];
      const level = (r + g + b) / 3;
      sum += level;
      if (level > 16) lit += 1;
      if (Math.max(r, g, b) - Math.min(r, g, b) > 48) coloured += 1;
    }
    return {
      width,
      height,
      mean: sum / pixels,
      litFraction: lit / pixels,
      colouredFraction: coloured / pixels,
    };
  });
}

async function waitForCanvas(page, timeout, minLit = 0.05) {
  const deadline = Date.now() + timeout;
  let stats = null;
  while (Date.now() < deadline) {
    stats = await canvasStats(page);
    if (stats && stats.litFraction >= minLit) return stats;
    await sleep(500);
  }
  return stats;
}

async function main() {
  const args = parseArgs(process.argv.slice(2));
  fs.mkdirSync(args.out, { recursive: true });
  const started = Date.now();
  const browser = await puppeteer.launch({
    executablePath: args.chromium,
    headless: true,
    args: [
      '--no-sandbox',
      '--disable-dev-shm-usage',
      '--enable-unsafe-swiftshader',
      '--use-angle=swiftshader',
      '--window-size=1600,1000',
    ],
    defaultViewport: { width: 1600, height: 1000 },
  });
  const result = { console: [], errors: [], failure: null };
  let page = null;
  try {
    page = await browser.newPage();
    page.on('console', msg => {
      if (!['error', 'warn'].includes(msg.type())) return;
      const parts = msg.args().map(arg => arg.remoteObject().description || arg.remoteObject().value);
      result.console.push(`${msg.type()}: ${parts.join(' ') || msg.text()}`.slice(0, 500));
    });
    page.on('pageerror', err => result.errors.push(String(err)));
    const studyUrl = `${args.url}/viewer?StudyInstanceUIDs=${encodeURIComponent(args.study)}`;
    await page.goto(studyUrl, { waitUntil: 'networkidle2', timeout: args.timeout });
    await page.waitForSelector('[data-cy="viewport-pane"]', { timeout: args.timeout });
    await skipTour(page);
    result.studyCanvas = await waitForCanvas(page, args.timeout / 3);
    await page.screenshot({ path: path.join(args.out, 'study.png') });

    await openSeries(page, args.sr, args.timeout);
    const srDeadline = Date.now() + args.timeout / 2;
    let text = await visibleText(page);
    while (Date.now() < srDeadline && text.svg.length === 0) {
      await sleep(500);
      text = await visibleText(page);
    }
    await sleep(1500); // let the text box settle before the screenshot
    result.srText = await visibleText(page);
    result.srCanvas = await canvasStats(page);
    await page.screenshot({ path: path.join(args.out, 'sr.png') });

    await openSeries(page, args.sc, args.timeout);
    await sleep(1000);
    result.scCanvas = await waitForCanvas(page, args.timeout / 3, 0.2);
    await sleep(1000);
    result.scCanvas = await canvasStats(page);
    await page.screenshot({ path: path.join(args.out, 'sc.png') });
  } catch (err) {
    result.failure = String(err.stack || err);
    if (page) {
      await page.screenshot({ path: path.join(args.out, 'failure.png') }).catch(() => {});
      result.failureText = await visibleText(page).catch(() => null);
    }
  } finally {
    await browser.close();
  }
  result.seconds = (Date.now() - started) / 1000;
  result.screenshots = ['study.png', 'sr.png', 'sc.png'].map(name => path.join(args.out, name));
  process.stdout.write(`${JSON.stringify(result)}\n`);
  if (result.failure) process.exit(1);
}

main().catch(err => {
  process.stderr.write(`ohif_check: ${err.stack || err}\n`);
  process.exit(1);
});
