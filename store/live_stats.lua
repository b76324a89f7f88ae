-- Shared (store/scripts.py puts it in front of serving_step.lua): the live figures of a
-- window and the comparison of two, the same as store/live.py window_stats and z_score.

-- A window's figures: outcomes n, trades (not 'hold'), losses (P&L < 0), mean P&L per
-- decision (a hold counts as 0) and its sample variance. A value that is neither a number
-- nor 'hold' (not one score_live.lua writes) is left out.
local function window_stats(key)
  local pnls = {}
  local trades, losses, sum = 0, 0, 0
  for _, text in ipairs(redis.call('LRANGE', key, 0, -1)) do
    local pnl = text == 'hold' and 0 or tonumber(text)
    if pnl ~= nil then
      if text ~= 'hold' then
        trades = trades + 1
        if pnl < 0 then losses = losses + 1 end
      end
      table.insert(pnls, pnl)
      sum = sum + pnl
    end
  end
  local n = #pnls
  local mean = n > 0 and sum / n or 0
  local squares = 0
  for _, pnl in ipairs(pnls) do squares = squares + (pnl - mean) ^ 2 end
  return {
    n = n, trades = trades, losses = losses, mean = mean,
    variance = n > 1 and squares / (n - 1) or 0,
    loss_rate = trades > 0 and losses / trades or 0,
  }
end

-- How many standard errors a's mean P&L per decision lies above b's (Welch): negative when
-- a did worse. Infinite when both windows hold one value each over and over.
local function z_score(a, b)
  local difference = a.mean - b.mean
  local error = math.sqrt(a.variance / a.n + b.variance / b.n)
  if error > 0 then return difference / error end
  if difference > 0 then return math.huge end
  if difference < 0 then return -math.huge end
  return 0
end
