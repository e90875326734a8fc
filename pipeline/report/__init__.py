"""`divico report`: what a user shows of models already trained and evaluated: the efficiency
report (efficiency.py) and the accuracy-vs-tau table and plot (accuracy.py)."""
