"""Sample-based evaluation metrics."""
from piflow.eval.distances import (
    DEFAULT_MMD_BANDWIDTHS,
    coupling_error,
    energy_distance,
    mmd_rbf,
    mode_statistics,
    sliced_wasserstein2,
    wasserstein2_1d,
)

__all__ = [
    "DEFAULT_MMD_BANDWIDTHS",
    "coupling_error",
    "energy_distance",
    "mmd_rbf",
    "mode_statistics",
    "sliced_wasserstein2",
    "wasserstein2_1d",
]

# Image metrics (the names above are the 2-D sample distances).
from piflow.eval.features import (  # noqa: E402
    FeatureClassifier, extract_features, load_feature_classifier, save_feature_classifier, train_feature_classifier,
)
from piflow.eval.image_metrics import (  # noqa: E402
    class_histogram, class_histogram_tv, data_distance_ratio, feature_statistics, frechet_distance,
    frechet_distance_from_features, high_frequency_fraction, isolated_bright_pixels, kernel_inception_distance,
    nearest_neighbour_distances, precision_recall_density_coverage,
)

__all__ += [
    "FeatureClassifier", "extract_features", "load_feature_classifier", "save_feature_classifier",
    "train_feature_classifier", "class_histogram", "class_histogram_tv", "feature_statistics", "frechet_distance",
    "frechet_distance_from_features", "kernel_inception_distance", "precision_recall_density_coverage",
    "high_frequency_fraction", "isolated_bright_pixels", "nearest_neighbour_distances", "data_distance_ratio",
]

# Diversity of a sample set in a feature space (overall and within each class).
from piflow.eval.diversity import mean_pairwise_distance, per_class_diversity, vendi_score  # noqa: E402

__all__ += ["mean_pairwise_distance", "per_class_diversity", "vendi_score"]
