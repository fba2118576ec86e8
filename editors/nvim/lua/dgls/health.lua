--- :checkhealth dgls - Neovim version, server command, engine reachable, model loaded.
--- Reads the options and the last dgls/status; asks `dgls engine status --json` for the engine.

local M = {}

local health = vim.health

local function engine_status()
  local ok, result = pcall(function()
    return vim.system(require('dgls.commands').cli({ 'engine', 'status', '--json' }), { text = true }):wait(15000)
  end)
  if not ok or not result.stdout or result.stdout == '' then
    return nil, ok and (result.stderr or '') or tostring(result)
  end
  local decoded_ok, decoded = pcall(vim.json.decode, vim.trim(result.stdout))
  return decoded_ok and decoded or nil, result.stderr
end

function M.check()
  local config = require('dgls.config')
  local dgls = require('dgls')
  local opts = config.options

  health.start('dgls: Neovim')
  local v = vim.version()
  local version = ('%d.%d.%d'):format(v.major, v.minor, v.patch)
  if vim.fn.has('nvim-0.12') == 1 then
    health.ok('Neovim ' .. version .. ': vim.lsp.inline_completion')
  elseif vim.fn.has('nvim-0.10') == 1 then
    health.ok('Neovim ' .. version .. ': ghost text drawn by dgls (extmarks)')
  else
    health.error('Neovim ' .. version .. ' is too old; dgls needs 0.10 or newer')
  end
  health.info('inline backend: ' .. require('dgls.completion').backend())

  health.start('dgls: server')
  if vim.fn.executable(opts.cmd[1]) == 1 then
    health.ok(('server command: %s (%s)'):format(table.concat(opts.cmd, ' '), vim.fn.exepath(opts.cmd[1])))
  else
    health.error(('server command %q not found'):format(opts.cmd[1]),
      { "install dgls (pip install -e . in the repo) or set cmd = { '/path/to/python', '-P', '-m', 'dgls', 'lsp' }" })
    return
  end
  -- :checkhealth opens its own buffer: report the dgls client of any buffer.
  local get = vim.lsp.get_clients or vim.lsp.get_active_clients
  local client = get({ name = dgls.name })[1]
  if client then
    health.ok(('running (client %d) for %d buffer(s)'):format(client.id, vim.tbl_count(client.attached_buffers)))
  else
    health.info('not running; it starts for filetypes: ' .. table.concat(opts.filetypes, ', '))
  end

  health.start('dgls: engine')
  local status, stderr = engine_status()
  if not status then
    health.warn('could not ask the engine: ' .. vim.trim(stderr or ''))
  elseif status.ready then
    health.ok(('engine reachable on %s: pid %s, %s'):format(tostring(status.socket), tostring(status.pid),
      tostring(status.device)))
    health.ok('model loaded: ' .. tostring(status.model))
  elseif status.loading then
    health.warn(('engine loading the model (%d%%)'):format(math.floor(100 * (status.loading_progress or 0))))
  elseif status.pid == nil then
    health.warn(('no engine on %s; the server starts it on first use'):format(status.socket or 'the default socket'))
  else
    health.error('engine not ready: ' .. tostring(status.error or '?'))
  end
  local last = client and dgls.status[client.id]
  if last then
    local latency = tonumber(last.lastLatencyMs)
    health.info(('last dgls/status: %s%s'):format(last.state or '?',
      latency and (', last completion %d ms'):format(latency) or ''))
  end
end

return M
