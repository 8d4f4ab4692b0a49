"""The sweep's Pareto front and chosen model, against hand-made points (the sweep tests in
test_farm.py check them on real trials)."""

import math

from farm.sweep import choose_model, pareto_front

#            0     1     2     3     4     5     6     7
PARAMS = [1000, 400, 400, 250, 900, 250, 2000, 100]
R2 = [0.90, 0.80, 0.70, 0.60, 0.95, 0.60, 0.95, math.nan]


def test_pareto_front_is_the_undominated_points_by_size():
    # 2 is dominated by 1 (same size, lower R²); 0 by 4 (smaller, higher); 6 by 4 (same R², larger);
    # 3 and 5 tie exactly (neither dominates the other); 7 has no score
    assert pareto_front(PARAMS, R2) == [3, 5, 1, 4]
    assert pareto_front([10], [0.5]) == [0]
    assert pareto_front([], []) == []


def test_choose_model_takes_the_smallest_within_eps_of_the_distilled_model():
    # distilled R² 0.9, eps 0.02: the bar is 0.882 -> 0 (1000, 0.90) and 4 (900, 0.95) and 6 qualify
    assert choose_model(PARAMS, R2, r2_distilled=0.9, eps=0.02) == 4
    # bar 0.89 * 0.9 = 0.801: 1 (400, 0.80) just misses it
    assert choose_model(PARAMS, R2, r2_distilled=0.89, eps=0.10) == 4
    assert choose_model(PARAMS, R2, r2_distilled=0.85, eps=0.10) == 1  # bar 0.765
    # equal sizes: the higher R² (3 and 5 tie in both: the first)
    assert choose_model(PARAMS, R2, r2_distilled=0.6, eps=0.0) == 3
    assert choose_model(PARAMS, R2, r2_distilled=0.99, eps=0.0) is None  # nothing reaches the bar
