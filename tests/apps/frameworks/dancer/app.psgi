# A Dancer2 app as its users write one: sessions, templates, hooks, and
# Plack middleware around it.
use strict;
use warnings;
use File::Basename ();
use File::Spec ();
use lib File::Spec->catdir(File::Spec->rel2abs(File::Basename::dirname(__FILE__)), 'lib');
use Plack::Builder;
use DancerApp;

builder {
    enable 'XFramework', framework => 'Dancer2';
    enable 'ContentLength';
    DancerApp->to_app;
};
