import { Notification } from '@jupyterlab/apputils';

import { IKernelInfo, money, shapeLabel } from './api';

type Kind = 'info' | 'success' | 'warning' | 'error';

/** What a user is told when a pool kernel's state changes, or null for nothing. */
export function transition(
  before: string | undefined,
  info: IKernelInfo,
  usdPerHour: number | null,
  notSaved: string[]
): { kind: Kind; text: string } | null {
  const g = info.gpupool;
  const now = g.state ?? '';
  if (now === before) {
    return null;
  }
  const shape = shapeLabel(g.gpu_type ?? '?', g.gpu_count ?? 1);
  const billing = usdPerHour === null ? '' : ` at ${money(usdPerHour)}/h`;
  const reason = (g.reason ?? '').trim();
  switch (now) {
    case 'queued':
      return {
        kind: 'info',
        text:
          `Your ${shape} kernel is queued (position ${g.queue_position ?? 1}): ` +
          'it starts when a GPU frees up, and billing starts then.'
      };
    case 'running':
      if (before === undefined) {
        return null; // first sight: nothing changed while the user watched
      }
      if (before === 'suspended' || before === 'resuming') {
        const lost = notSaved.length
          ? ` Not restored: ${notSaved.join(', ')}.`
          : ' Its variables are back.';
        return {
          kind: 'success',
          text: `Your ${shape} kernel resumed; billing restarted${billing}.${lost}`
        };
      }
      return { kind: 'success', text: `${shape} is yours; billing started${billing}.` };
    case 'suspended': {
      if (before === undefined) {
        return null;
      }
      // Lab cuts a toast at 140 characters: the gateway's reason is summed up, not quoted.
      const why = /^suspended ([^;]*)/.exec(reason)?.[1] ?? reason.split(';')[0];
      const lost = notSavedNames(reason);
      return {
        kind: 'warning',
        text:
          `Your ${shape} kernel is suspended${why ? ` ${why}` : ''}; billing stopped. ` +
          (lost.length ? `Not saved: ${lost.join(', ')}. ` : '') +
          'The next cell resumes it.'
      };
    }
    case 'dead':
      if (before === undefined) {
        return null;
      }
      return {
        kind: 'error',
        text:
          `Your ${shape} kernel is lost${reason ? ` (${reason.split(';')[0]})` : ''}: its ` +
          'variables are gone. ' +
          'Restart the kernel to get a GPU again.'
      };
    default:
      return null; // starting, resuming: the next state says what matters
  }
}

/** The names a suspend could not save, as the suspended kernel's reason lists them. */
export function notSavedNames(reason: string | null | undefined): string[] {
  const match = /not saved: ([^.]*)\./.exec(reason ?? '');
  return match ? match[1].split(',').map(name => name.trim()).filter(Boolean) : [];
}

/**
 * Tells the user, once per change, when a pool kernel is queued, gets its GPU, is suspended,
 * resumes or is lost. Remembers the last state seen per kernel, so following another notebook
 * and back does not tell the same change twice.
 */
export class KernelNotifier {
  private seen = new Map<string, string>();
  private notSaved = new Map<string, string[]>();

  constructor(private rate: (info: IKernelInfo) => number | null) {}

  update(info: IKernelInfo): void {
    const state = info.gpupool.state;
    if (!state) {
      return;
    }
    const before = this.seen.get(info.id);
    this.seen.set(info.id, state);
    if (state === 'suspended') {
      this.notSaved.set(info.id, notSavedNames(info.gpupool.reason));
    }
    const told = transition(before, info, this.rate(info), this.notSaved.get(info.id) ?? []);
    if (state === 'running') {
      this.notSaved.delete(info.id);
    }
    if (told) {
      Notification[told.kind](`GPU pool: ${told.text}`, {
        autoClose: told.kind === 'error' ? false : 10000
      });
    }
  }
}
