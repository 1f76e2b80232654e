import { Notification } from '@jupyterlab/apputils';
import { URLExt } from '@jupyterlab/coreutils';
import { ServerConnection } from '@jupyterlab/services';

/** A pool shape as GET /gpupool/shapes gives it. */
export interface IShape {
  name: string;
  kernel_name: string | null;
  display_name: string;
  gpu_type: string;
  gpu_count: number;
  memory_gb: number | null;
  usd_per_hour: number | null;
  free: number | null;
  queue: number | null;
}

/** One GPU a pool kernel holds, as its host last reported it. */
export interface IGpuReading {
  uuid: string;
  utilization: number | null; // percent; null where the GPU cannot say (MIG)
  memory_used: number | null; // bytes
  memory_total: number | null; // bytes
}

/** A pool kernel as GET /gpupool/kernels/<id> gives it. */
export interface IKernelInfo {
  id: string;
  execution_state: string | null;
  gpupool: {
    state?: string;
    gpu_type?: string;
    gpu_count?: number;
    queue_position?: number;
    billed_seconds?: number;
    cost_usd?: number;
    idle_timeout?: number;
    idle_deadline?: string | null;
    idle_seconds_left?: number | null;
    reason?: string | null;
    host?: string; // these three while the kernel holds its GPUs
    started?: string;
    gpus?: IGpuReading[];
  };
}

export interface IUsageDay {
  date: string;
  gpu_hours: number;
  cost_usd: number;
}

export interface IUsage {
  days: IUsageDay[];
  kernels: {
    kernel_id: string;
    gpu_type: string;
    gpu_count: number;
    gpu_hours: number;
    cost_usd: number;
    open: boolean;
  }[];
  total_gpu_hours: number;
  total_cost_usd: number;
  budget: { [key: string]: unknown } | null;
}

/** An answer of the server extension that is not a success: `{reason, message}`. */
export class GpupoolError extends Error {
  constructor(
    readonly status: number,
    readonly reason: string,
    message: string
  ) {
    super(message);
  }
}

const shown = new Set<string>();

/** Show a gateway problem once (per reason), until a request succeeds again. */
export function reportOnce(error: unknown): void {
  const reason = error instanceof GpupoolError ? error.reason : 'error';
  if (shown.has(reason)) {
    return;
  }
  shown.add(reason);
  const message = error instanceof Error ? error.message : String(error);
  Notification.error(`GPU pool: ${message}`, { autoClose: 10000 });
}

/** GET (or `init`'s method) /gpupool/<path> on this Jupyter server (which holds the
 * gateway's token). */
export async function requestAPI<T>(path: string, init: RequestInit = {}): Promise<T> {
  const settings = ServerConnection.makeSettings();
  const url = URLExt.join(settings.baseUrl, 'gpupool', path);
  let response: Response;
  try {
    response = await ServerConnection.makeRequest(url, init, settings);
  } catch (error) {
    throw new GpupoolError(0, 'server unreachable', 'This Jupyter server does not answer.');
  }
  let data: any = null;
  try {
    data = await response.json();
  } catch {
    data = null;
  }
  if (!response.ok) {
    throw new GpupoolError(
      response.status,
      (data && data.reason) || String(response.status),
      (data && data.message) || `The server answered ${response.status}.`
    );
  }
  shown.clear();
  return data as T;
}

/** "H100 ×1" */
export function shapeLabel(gpuType: string, count: number): string {
  return `${gpuType} \u00d7${count}`;
}

export function money(usd: number | null | undefined, digits = 2): string {
  return usd === null || usd === undefined ? '?' : `$${usd.toFixed(digits)}`;
}

/** 272 -> "4:32", 3700 -> "1:01:40" */
export function clock(seconds: number): string {
  const s = Math.max(0, Math.floor(seconds));
  const h = Math.floor(s / 3600);
  const m = Math.floor((s % 3600) / 60);
  const pad = (n: number) => String(n).padStart(2, '0');
  return h ? `${h}:${pad(m)}:${pad(s % 60)}` : `${m}:${pad(s % 60)}`;
}
