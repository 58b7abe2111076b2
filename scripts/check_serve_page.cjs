// Drives `knobs serve`'s web page in headless Chromium: waits for the adapter sliders, sets
// one adapter's weight, submits a prompt, and checks that a generated image appears and that
// the cache table then shows the adapter loaded. Usage (see check_serve_page.sh):
//   NODE_PATH=DIR/node_modules node scripts/check_serve_page.cjs URL ADAPTER SCREENSHOT.png
const { chromium } = require('playwright-core');

(async () => {
  const [url, adapter, screenshot] = process.argv.slice(2);
  const browser = await chromium.launch({
    executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
    args: ['--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run', '--disable-background-networking',
      '--disable-component-update', '--disable-sync'],
  });
  try {
    const page = await browser.newPage();
    await page.goto(url);
    const slider = `#w-${adapter}`;
    await page.waitForSelector(slider);
    await page.fill('#prompt', 'a red circle on a white background');
    await page.fill('#steps', '4');
    await page.$eval(slider, (el) => { el.value = '1'; el.dispatchEvent(new Event('input')); });
    await page.click('#generate');
    const img = await page.waitForSelector('img.generated', { timeout: 120000 });
    await page.waitForFunction(() => document.querySelector('img.generated').complete);
    const size = await img.evaluate((el) => [el.naturalWidth, el.naturalHeight]);
    if (!(size[0] > 0 && size[1] > 0)) throw new Error(`the image did not decode: ${size}`);
    await page.waitForFunction((name) => [...document.querySelectorAll('#cache tbody tr')]
      .some((tr) => tr.children[0].textContent === name && tr.children[5].textContent === 'yes'), adapter, { timeout: 10000 });
    const status = await page.textContent('#status');
    await page.screenshot({ path: screenshot, fullPage: true });
    console.log(JSON.stringify({ ok: true, image: size, status }));
  } finally {
    await browser.close();
  }
})().catch((e) => { console.error(e); process.exit(1); });
