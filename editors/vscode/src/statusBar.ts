/**
 * The status bar item: engine state, model and last latency, from the server's `dgls/status` notification.
 * Knows nothing about how the status arrives.
 */
import * as vscode from 'vscode';

/** The `dgls/status` notification's params (the fields this item shows). */
export interface EngineStatus {
  state?: string;
  model?: string | null;
  device?: string | null;
  socket?: string;
  lastLatencyMs?: number | null;
  message?: string | null;
  debounceMs?: number;
  [counter: string]: unknown;
}

const ICONS: Record<string, string> = {
  ready: '$(sparkle)',
  starting: '$(sync~spin)',
  restarting: '$(sync~spin)',
  failed: '$(error)',
  stopped: '$(circle-slash)',
};

export class StatusBar implements vscode.Disposable {
  private readonly item = vscode.window.createStatusBarItem('dgls.status', vscode.StatusBarAlignment.Right, 100);
  last: EngineStatus = {};

  constructor(showLogCommand: string) {
    this.item.name = 'dgls';
    this.item.command = showLogCommand;
    this.show({ state: 'starting' });
    this.item.show();
  }

  show(status: EngineStatus): void {
    this.last = status;
    const state = status.state ?? 'unknown';
    const model = status.model ? String(status.model).split(/[\\/]/).filter(Boolean).pop() : undefined;
    const latency = typeof status.lastLatencyMs === 'number' ? `${Math.round(status.lastLatencyMs)} ms` : undefined;
    this.item.text = [`${ICONS[state] ?? '$(circle-outline)'} dgls: ${state}`, model, latency]
      .filter(Boolean)
      .join(' · ');
    const tooltip = new vscode.MarkdownString();
    tooltip.appendMarkdown(`**dgls** engine: ${state}\n\n`);
    if (status.model) tooltip.appendMarkdown(`model: \`${status.model}\`\n\n`);
    if (status.device) tooltip.appendMarkdown(`device: ${status.device}\n\n`);
    if (latency) tooltip.appendMarkdown(`last completion: ${latency}\n\n`);
    if (status.message) tooltip.appendMarkdown(`${status.message}\n\n`);
    tooltip.appendMarkdown('Click to show the log.');
    this.item.tooltip = tooltip;
    this.item.backgroundColor =
      state === 'failed' ? new vscode.ThemeColor('statusBarItem.errorBackground') : undefined;
  }

  dispose(): void {
    this.item.dispose();
  }
}
