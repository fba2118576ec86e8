--- dgls.commands: :DglsFill, :DglsRewrite [instruction], :DglsRestart, :DglsStatus, :DglsLog.
---
--- Fill and rewrite send `workspace/executeCommand` (dgls.fillSelection / dgls.rewriteSelection) with the
--- selection's URI and LSP range; the server answers with one `workspace/applyEdit`, which Neovim applies.
--- Knows nothing about ghost text.

local position = require('dgls.position')

local M = {}

--- The LSP range of the last visual selection, or of lines line1..line2 when the command got a line range
--- that is not the visual one.
---@return table? range
function M.selection_range(bufnr, line1, line2, encoding)
  local vstart, vend = vim.api.nvim_buf_get_mark(bufnr, '<'), vim.api.nvim_buf_get_mark(bufnr, '>')
  local mode = vim.fn.visualmode()
  local srow, scol, erow, ecol -- 0-based rows, byte columns, end exclusive
  if vstart[1] == line1 and vend[1] == line2 and mode ~= 'V' and mode ~= '' then
    srow, scol, erow = vstart[1] - 1, vstart[2], vend[1] - 1
    local line = position.line(bufnr, erow)
    -- '> points at the first byte of the last selected character: include the whole character.
    local char_len = vim.str_utf_end and (vim.str_utf_end(line, vend[2] + 1) + 1) or 1
    ecol = math.min(vend[2] + char_len, #line)
    if vim.o.selection == 'exclusive' then
      ecol = vend[2]
    end
  else
    srow, scol, erow = line1 - 1, 0, line2 - 1
    ecol = #position.line(bufnr, erow)
  end
  return {
    start = position.lsp_position(bufnr, srow, scol, encoding),
    ['end'] = position.lsp_position(bufnr, erow, ecol, encoding),
  }
end

--- Run dgls.fillSelection or dgls.rewriteSelection on the selection.
---@param command 'dgls.fillSelection'|'dgls.rewriteSelection'
---@param args { line1: integer, line2: integer, instruction?: string }
function M.run_on_selection(command, args)
  local dgls = require('dgls')
  local bufnr = vim.api.nvim_get_current_buf()
  local client = dgls.client(bufnr)
  if not client then
    dgls.notify('no dgls server attached to this buffer (:checkhealth dgls)', vim.log.levels.WARN)
    return
  end
  local argument = {
    uri = vim.uri_from_bufnr(bufnr),
    range = M.selection_range(bufnr, args.line1, args.line2, client.offset_encoding),
    version = vim.lsp.util.buf_versions[bufnr],
    instruction = args.instruction or '',
  }
  dgls.request(client, 'workspace/executeCommand', { command = command, arguments = { argument } },
    function(err, result)
      if err then
        dgls.notify(('%s failed: %s'):format(command, err.message or vim.inspect(err)), vim.log.levels.ERROR)
      elseif type(result) == 'table' and result.applied == false then
        dgls.notify(('%s: %s'):format(command, result.reason or 'not applied'), vim.log.levels.WARN)
      end
      vim.api.nvim_exec_autocmds('User', { pattern = 'DglsCommandDone', modeline = false,
        data = { command = command, error = err, result = result } })
    end, bufnr)
end

function M.fill(opts)
  M.run_on_selection('dgls.fillSelection', { line1 = opts.line1, line2 = opts.line2 })
end

function M.rewrite(opts)
  M.run_on_selection('dgls.rewriteSelection', { line1 = opts.line1, line2 = opts.line2, instruction = opts.args })
end

--- `cmd` with its 'lsp' subcommand swapped for `subcommand` (a list), e.g. { 'dgls', 'engine', 'stop' }.
---@param subcommand string[]
---@return string[]
function M.cli(subcommand)
  local options = require('dgls.config').options
  local argv = {}
  for _, part in ipairs(options.cmd) do
    if part == 'lsp' then
      break
    end
    table.insert(argv, part)
  end
  vim.list_extend(argv, subcommand)
  local socket = vim.tbl_get(options.server, 'engine', 'socket')
  if socket then
    vim.list_extend(argv, { '--socket', vim.fn.expand(socket) })
  end
  return argv
end

--- Stop the engine (`dgls engine stop`), then restart the language server, which starts the engine again
--- (with the current options) on first use.
function M.restart()
  local dgls = require('dgls')
  dgls.notify('restarting the engine')
  vim.system(M.cli({ 'engine', 'stop' }), { text = true }, vim.schedule_wrap(function(result)
    if result.code ~= 0 then
      dgls.notify('dgls engine stop failed: ' .. vim.trim(result.stderr or ''), vim.log.levels.WARN)
    end
    dgls.restart()
  end))
end

function M.status()
  local dgls = require('dgls')
  local client = dgls.client()
  if not client then
    dgls.notify('no dgls server attached to this buffer')
    return
  end
  dgls.notify(dgls.statusline() .. '\n' .. vim.inspect(dgls.status[client.id] or {}))
end

--- Open Neovim's LSP log (the server's stderr and window/logMessage lines land there) in a new tab.
function M.log()
  local log = vim.lsp.log
  local path = (log and log.get_filename and log.get_filename()) or vim.lsp.get_log_path()
  vim.cmd.tabnew(vim.fn.fnameescape(path))
end

function M.register()
  local create = vim.api.nvim_create_user_command
  create('DglsFill', M.fill, { range = true, desc = '[dgls] fill the selection from its context' })
  create('DglsRewrite', M.rewrite, { range = true, nargs = '*', desc = '[dgls] rewrite the selection' })
  create('DglsRestart', M.restart, { desc = '[dgls] restart the engine and the server' })
  create('DglsStatus', M.status, { desc = '[dgls] show engine state, model and last latency' })
  create('DglsLog', M.log, { desc = "[dgls] open the LSP log (the server's messages)" })
end

return M
