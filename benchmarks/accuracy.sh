#!/usr/bin/env bash
# Reproduces the README accuracy tables: trains each model on its data set's training split and
# backtests it through the serving engine beside the baselines, then the linear references. ~70 min
# on one core.
# Usage: bash benchmarks/accuracy.sh [DATA_DIR] [OUT_DIR]
set -euo pipefail
D=${1:-../shared/data}
O=${2:-out/accuracy}
P=${PIPELINE:-.venv/bin/pipeline}
mkdir -p "$O"
COMMON=(--loss mae --batch-lanes 16 --seed 0 --threads 1)
ETT_COLS=HUFL,HULL,MUFL,MULL,LUFL,LULL,OT
ETT_SPLIT=(--split 12mo,4mo,4mo)  # the ETT protocol: 12/4/4 months of 30 days from the start

# The shipped model (univariate, broad corpus: `make train` writes it in place), on each ETT OT.
for f in ETTh1.csv ETTh2.csv ETTm1.csv.gz ETTm2.csv.gz; do
  s=${f%%.*}; season=24; [[ $s == ETTm* ]] && season=96
  $P backtest --data "$D/$f" --target OT "${ETT_SPLIT[@]}" --season $season \
    --out "$O/default-$s.json"
done

# One model per ETT file with the six load channels as covariates.
for f in ETTh1.csv ETTh2.csv ETTm1.csv.gz ETTm2.csv.gz; do
  s=${f%%.*}; season=24; [[ $s == ETTm* ]] && season=96
  $P train --data "$D/$f" --target OT --features $ETT_COLS "${ETT_SPLIT[@]}" "${COMMON[@]}" --epochs 20 \
    --name "$s-cov" --out "$O/$s-cov.pt"
  $P backtest --data "$D/$f" --target OT --features $ETT_COLS "${ETT_SPLIT[@]}" --model "$O/$s-cov.pt" \
    --season $season --out "$O/cov-$s.json"
done

# Cells compared on ETTh1 (same options as ETTh1-cov above).
for c in lstm rnn; do
  $P train --data "$D/ETTh1.csv" --target OT --features $ETT_COLS "${ETT_SPLIT[@]}" "${COMMON[@]}" --epochs 20 \
    --cell $c --name "ETTh1-cov-$c" --out "$O/ETTh1-cov-$c.pt"
done
$P backtest --data "$D/ETTh1.csv" --target OT --features $ETT_COLS "${ETT_SPLIT[@]}" --model "$O/ETTh1-cov.pt" \
  --model "$O/ETTh1-cov-lstm.pt" --model "$O/ETTh1-cov-rnn.pt" --baselines persistence \
  --out "$O/cells-ETTh1.json"

# Beijing: PM2.5 of 12 stations, last 20% of each station scored.
BJ=(--data "$D/beijing_air_quality_12stations.csv.gz" --format long --stream-col station
    --time-col year,month,day,hour --target PM2.5 --features PM2.5,PM10,TEMP,DEWP,WSPM,PRES)
$P train "${BJ[@]}" "${COMMON[@]}" --calendar --lr 5e-4 --epochs 10 --patience 4 \
  --name beijing-pm25 --out "$O/beijing.pt"
$P backtest "${BJ[@]}" --model "$O/beijing.pt" --season 24 --out "$O/backtest-beijing.json"

# US stocks: close price, log-return target, forecasts in price units.
ST=(--data "$D/us_stocks_1min_2024_10symbols.csv.gz" --format long --stream-col symbol
    --time-col timestamp --target close)
$P train "${ST[@]}" "${COMMON[@]}" --target-transform log --epochs 8 --name stocks-close \
  --out "$O/stocks.pt"
$P backtest "${ST[@]}" --model "$O/stocks.pt" --season 390 --out "$O/backtest-stocks.json"

# Linear references for the missed targets (README: "Are the missed targets within reach?").
LB=(${PYTHON:-.venv/bin/python} -m benchmarks.linear_bound)
"${LB[@]}" --data "$D/ETTh1.csv" --target OT "${ETT_SPLIT[@]}" --lags 168 --out "$O/bound-ETTh1.json"
"${LB[@]}" --data "$D/ETTh1.csv" --target OT --features $ETT_COLS "${ETT_SPLIT[@]}" --lags 168 \
  --out "$O/bound-ETTh1-cov.json"
"${LB[@]}" --data "$D/ETTm1.csv.gz" --target OT "${ETT_SPLIT[@]}" --lags 384 --out "$O/bound-ETTm1.json"
"${LB[@]}" --data "$D/ETTm1.csv.gz" --target OT --features $ETT_COLS "${ETT_SPLIT[@]}" --lags 96 \
  --out "$O/bound-ETTm1-cov.json"
"${LB[@]}" "${BJ[@]}" --lags 48 --cov-lags 6 --steps 600 --out "$O/bound-beijing.json"  # ~6 min
