--- dgls.completion.native: ghost text on Neovim >= 0.12 through vim.lsp.inline_completion, which draws and
--- accepts; dgls adds partial accepts, candidate cycling that asks the server for more, and the
--- dgls/didShowCompletion notification. Knows nothing about the extmarks backend.

local shared = require('dgls.completion.shared')

local api = vim.api
local M = {}

--- Per-buffer state: candidate count of the last answer, and a pending "ask for candidates" move.
---@type table<integer, table>
local state = {}

local function native_lsp_item(item)
  local client = vim.lsp.get_client_by_id(item.client_id)
  local range = item.range and item.range.to_lsp and item.range:to_lsp(client and client.offset_encoding or 'utf-16')
  return { insertText = item.insert_text, range = range, command = item.command }
end

--- Wrap the client's request so inline completion results feed dgls: count candidates, send didShow,
--- and turn the next request into an invoked one when the user asked for more candidates.
local function wrap_native_requests(client, bufnr)
  if client._dgls_wrapped then
    return
  end
  client._dgls_wrapped = true
  local request = client.request
  client.request = function(self, method, params, handler, req_bufnr)
    if method ~= 'textDocument/inlineCompletion' or type(handler) ~= 'function' then
      return request(self, method, params, handler, req_bufnr)
    end
    local buf_state = state[req_bufnr or bufnr] or {}
    local invoked = buf_state.invoke
    if invoked then
      buf_state.invoke = nil
      params.context.triggerKind = shared.TRIGGER_INVOKED
    end
    return request(self, method, params, function(err, result, ctx, cfg)
      handler(err, result, ctx, cfg)
      local items = result and (result.items or result) or {}
      buf_state.count = #items
      if items[1] and vim.startswith(api.nvim_get_mode().mode, 'i') then
        shared.notify_server(ctx.bufnr, 'dgls/didShowCompletion', { item = items[1] })
        if invoked and #items > 1 then
          vim.lsp.inline_completion.select({ bufnr = ctx.bufnr, count = invoked })
        end
      end
    end, req_bufnr)
  end
end


function M.attach(client, bufnr)
  state[bufnr] = state[bufnr] or {}
  wrap_native_requests(client, bufnr)
  vim.lsp.inline_completion.enable(true, { bufnr = bufnr })
end

function M.accept()
  return vim.lsp.inline_completion.get()
end

local function native_partial(take)
  local bufnr = api.nvim_get_current_buf()
  return vim.lsp.inline_completion.get({
    on_accept = function(item)
      local text = shared.item_text(item.insert_text)
      local start_row, start_col
      if item.range then
        start_row, start_col = item.range:to_extmark()
      end
      local ghost = shared.ghost_after_cursor(bufnr, text, start_row, start_col)
      if ghost then
        shared.accept_part(bufnr, native_lsp_item(item), ghost, take)
      end
      return nil -- dgls inserted the part itself
    end,
  })
end

function M.accept_word()
  return native_partial(shared.take_word)
end

function M.accept_line()
  return native_partial(shared.take_line)
end

local function native_cycle(count)
  local bufnr = api.nvim_get_current_buf()
  local buf_state = state[bufnr] or {}
  if (buf_state.count or 0) > 1 then
    vim.lsp.inline_completion.select({ bufnr = bufnr, count = count })
  else
    buf_state.invoke = count -- the next request asks for several candidates and moves by `count`
    api.nvim_exec_autocmds('CursorMovedI', { buffer = bufnr, modeline = false })
  end
  return true
end

function M.next()
  return native_cycle(1)
end

function M.prev()
  return native_cycle(-1)
end

function M.dismiss()
  -- get() with an on_accept that declines clears the suggestion and cancels pending requests.
  return vim.lsp.inline_completion.get({ on_accept = function() return nil end })
end

function M.visible()
  local bufnr = api.nvim_get_current_buf()
  local marks = api.nvim_buf_get_extmarks(bufnr, api.nvim_create_namespace('nvim.lsp.inline_completion'), 0, -1,
    { details = true })
  return #marks > 0
end

function M.attached(bufnr)
  return state[bufnr] ~= nil
end

return M
