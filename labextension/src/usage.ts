import { Widget } from '@lumino/widgets';

import { IUsage, money, requestAPI } from './api';

const SVG = 'http://www.w3.org/2000/svg';

function svg(tag: string, attrs: { [key: string]: string | number }): SVGElement {
  const node = document.createElementNS(SVG, tag);
  for (const [key, value] of Object.entries(attrs)) {
    node.setAttribute(key, String(value));
  }
  return node;
}

/** The tenant's GPU-hours and cost per day for the last 30 days, budget, and kernels. */
export class UsagePanel extends Widget {
  constructor() {
    super();
    this.id = 'gpupool-usage';
    this.title.label = 'GPU usage';
    this.title.closable = true;
    this.addClass('gpupool-usage');
  }

  async refresh(): Promise<void> {
    this.node.textContent = 'Loading GPU usage\u2026';
    try {
      this.draw(await requestAPI<IUsage>('usage'));
    } catch (error) {
      this.node.textContent = '';
      const p = document.createElement('p');
      p.className = 'gpupool-error';
      p.textContent = error instanceof Error ? error.message : String(error);
      this.node.appendChild(p);
    }
  }

  draw(usage: IUsage): void {
    this.node.textContent = '';
    const h2 = document.createElement('h2');
    h2.textContent = 'GPU usage, last 30 days';
    const summary = document.createElement('p');
    summary.className = 'gpupool-summary';
    summary.textContent =
      `${usage.total_gpu_hours.toFixed(usage.total_gpu_hours < 1 ? 3 : 2)} GPU-hours, ${money(usage.total_cost_usd)}` +
      budgetText(usage.budget);
    this.node.append(h2, summary, chart(usage), kernelTable(usage));
  }
}

function budgetText(budget: IUsage['budget']): string {
  if (!budget) {
    return '';
  }
  const limit = budget['budget_usd'];
  const used = budget['spent_this_month_usd'];
  if (typeof limit === 'number' && typeof used === 'number') {
    return `; budget for ${budget['month']}: ${money(used)} of ${money(limit)} (${Math.round((100 * used) / limit)}%)`;
  }
  if (typeof used === 'number') {
    return `; ${money(used)} spent in ${budget['month']}, no budget set`;
  }
  return '';
}

/** One bar per day (cost), dates under the first, middle and last bar, the top value. */
function chart(usage: IUsage): SVGElement {
  const width = 640;
  const height = 200;
  const left = 48;
  const bottom = 20;
  const top = 10;
  const days = usage.days;
  const peak = Math.max(...days.map(d => d.cost_usd), 0.01);
  const step = (width - left) / days.length;
  const root = svg('svg', { width, height, class: 'gpupool-chart', role: 'img' });
  const title = svg('title', {});
  title.textContent = 'Cost per day, last 30 days';
  root.appendChild(title);
  days.forEach((day, i) => {
    const barHeight = ((height - bottom - top) * day.cost_usd) / peak;
    const bar = svg('rect', {
      class: 'gpupool-bar',
      x: left + i * step + 1,
      y: height - bottom - barHeight,
      width: Math.max(1, step - 2),
      height: barHeight
    });
    const tip = svg('title', {});
    tip.textContent = `${day.date}: ${day.gpu_hours.toFixed(2)} GPU-hours, ${money(day.cost_usd, 4)}`;
    bar.appendChild(tip);
    root.appendChild(bar);
    if (i === 0 || i === days.length - 1 || i === Math.floor(days.length / 2)) {
      const anchor = i === 0 ? 'start' : i === days.length - 1 ? 'end' : 'middle';
      const label = svg('text', {
        class: 'gpupool-axis',
        x: left + i * step + (anchor === 'end' ? step : anchor === 'middle' ? step / 2 : 0),
        y: height - 5,
        'text-anchor': anchor
      });
      label.textContent = day.date.slice(5);
      root.appendChild(label);
    }
  });
  for (const [value, y] of [
    [peak, top + 8],
    [0, height - bottom]
  ] as [number, number][]) {
    const label = svg('text', { class: 'gpupool-axis', x: 0, y });
    label.textContent = money(value);
    root.appendChild(label);
  }
  return root;
}

function kernelTable(usage: IUsage): HTMLElement {
  const table = document.createElement('table');
  const head = table.createTHead().insertRow();
  for (const name of ['kernel', 'GPUs', 'GPU-hours', 'cost', '']) {
    const th = document.createElement('th');
    th.textContent = name;
    head.appendChild(th);
  }
  const body = table.createTBody();
  for (const k of usage.kernels) {
    const row = body.insertRow();
    for (const text of [
      k.kernel_id.slice(0, 8),
      `${k.gpu_type} \u00d7${k.gpu_count}`,
      k.gpu_hours.toFixed(3),
      money(k.cost_usd, 4),
      k.open ? 'holding GPUs' : ''
    ]) {
      row.insertCell().textContent = text;
    }
  }
  return table;
}
